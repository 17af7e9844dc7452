"""``create_model(name, ...)``: every architecture by name, as a :class:`Classifier`."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence

from backdoorlab.models.classifier import Classifier
from backdoorlab.registry import Registry

#: Builders by name: ``builder(num_classes, in_channels, mean, std, **kwargs) -> Classifier``.
#: What every builder gets from the data, not from the user: not options.
DATA_PARAMETERS = ("num_classes", "in_channels", "mean", "std")
#: A model takes images unless registered with ``modality="series"`` (``models.series``).
MODELS: Registry[Callable[..., Classifier]] = Registry("model", not_options=DATA_PARAMETERS, modality="image")


def check_model_options(name: str, options: dict[str, object]) -> dict[str, object]:
    """``options`` of model ``name`` checked (names, types, ranges) and converted; see
    :meth:`Registry.check_options`."""
    return MODELS.check_options(name, options)


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: object,
) -> Classifier:
    """Build a registered model.

    Args:
        name: registered name (``list_models()``); an unknown one raises with the valid names.
        num_classes: output classes.
        in_channels: input channels (1 for MNIST, 3 for CIFAR-10).
        mean, std: per-channel normalisation applied inside the model (default: none).
        kwargs: architecture options (for example ``width`` for ``airbench``).
    """
    builder = MODELS.get(name)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    mean = tuple(mean) if mean is not None else (0.0,) * in_channels
    std = tuple(std) if std is not None else (1.0,) * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean and std need {in_channels} values (one per input channel)")
    kwargs = check_model_options(name, kwargs)
    return builder(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **kwargs)


def list_models() -> list[str]:
    return MODELS.names()


@functools.lru_cache(maxsize=64)
def _fit_error(name: str, options_json: str, shape: tuple[int, ...], num_classes: int) -> str | None:
    import torch

    model = create_model(name, num_classes=num_classes, in_channels=shape[0], **json.loads(options_json))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    except RuntimeError as err:
        return str(err).strip().splitlines()[0]
    return None


def check_input_fits(name: str, options: dict[str, object], shape: tuple[int, ...], num_classes: int) -> None:
    """Refuse, before any work, a model that cannot take inputs of ``shape`` (one sample: a forward
    pass of zeros on the CPU), e.g. airbench's three poolings on 8x8 digits."""
    error = _fit_error(name, json.dumps(options, sort_keys=True), tuple(shape), num_classes)
    if error is not None:
        side = "x".join(map(str, shape[1:]))
        raise ValueError(f"model '{name}' cannot take {side} inputs with {shape[0]} channel(s): {error}")
