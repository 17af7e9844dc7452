"""Model files: a trained model's weights with the run config that made it, as safetensors.

``save_model(path, model, config)`` writes the weights (no pickle: a model file can be shared and
opened safely) and, in the file's metadata, the resolved run config and the shape (classes,
channels) the model was built for. ``load_model(path)`` rebuilds the model and the config, so that
``backdoorlab repair`` and ``backdoorlab detect`` can rerun the same data, trusted split and
trigger (everything is seeded from the config) around a stored model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from backdoorlab.defenses.nab import DefensiveTriggerClassifier
from backdoorlab.experiments.config import RunConfig
from backdoorlab.files import atomic_path
from backdoorlab.models.classifier import Classifier
from backdoorlab.models.registry import create_model

_KEY = "backdoorlab"
FORMAT_VERSION = 1


class ModelFileError(ValueError):
    """A model file that is missing, not safetensors, or not written by :func:`save_model`."""


def save_model(path: str | Path, model: Classifier, config: RunConfig) -> Path:
    """Write ``model``'s weights and, as metadata, ``config`` (resolved) and the model's shape; the
    file appears whole or not at all (:func:`~backdoorlab.files.atomic_path`)."""
    config = config.resolved()
    path = Path(path)
    shape = {"num_classes": model.num_classes, "in_channels": model.mean.numel()}
    meta = {"format": FORMAT_VERSION, "config": config.to_dict(), "shape": shape}
    if isinstance(model, DefensiveTriggerClassifier):  # NAB's: the stamp is no weight, so it is recorded
        meta["defensive_trigger"] = model.trigger_size
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={_KEY: json.dumps(meta)})
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``{"format", "config", "shape"}`` metadata of a model file (weights not loaded)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{path} is not a safetensors model file: {err}") from None
    if _KEY not in metadata:
        raise ModelFileError(f"{path} has no backdoorlab metadata (write it with `run --save-model` or save_model())")
    try:
        meta = json.loads(metadata[_KEY])
    except json.JSONDecodeError as err:
        raise ModelFileError(f"{path}: its backdoorlab metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: its backdoorlab metadata is not a JSON object")
    if meta.get("format") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: model file format {meta.get('format')!r}, this version reads {FORMAT_VERSION}")
    missing = [key for key in ("config", "shape") if not isinstance(meta.get(key), dict)]
    if missing:
        raise ModelFileError(
            f"{path}: its backdoorlab metadata has no {' or '.join(missing)} (write it with save_model())"
        )
    return meta


def load_model(path: str | Path) -> tuple[Classifier, RunConfig]:
    """Rebuild a model written by :func:`save_model` (in eval mode) and the run config that made it."""
    meta = read_metadata(path)
    try:
        config = RunConfig.from_dict(meta["config"])
        if config.model is None:
            raise ValueError("it names no model")
        model = create_model(config.model, **meta["shape"], **config.model_options)
    except (TypeError, ValueError, KeyError) as err:
        raise ModelFileError(f"{path}: its stored config cannot rebuild the model ({err})") from None
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ModelFileError(f"{path}: its weights cannot be read (truncated or corrupt?): {err}") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        reason = " ".join(str(err).split())  # load_state_dict's message spans lines
        raise ModelFileError(f"{path}: the weights do not fit model '{config.model}': {reason}") from None
    if meta.get("defensive_trigger"):
        model = DefensiveTriggerClassifier(model, int(meta["defensive_trigger"]))
    return model.eval(), config
