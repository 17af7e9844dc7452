"""``create_model(name, ...)``: every architecture by name, as a :class:`Classifier`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from backdoorlab.models.classifier import Classifier
from backdoorlab.registry import Registry

#: Builders by name: ``builder(num_classes, in_channels, mean, std, **kwargs) -> Classifier``.
MODELS: Registry[Callable[..., Classifier]] = Registry("model")


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
    return builder(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, **kwargs)


def list_models() -> list[str]:
    return MODELS.names()
