"""The training loop over tensors, its configuration, hooks and batched inference."""

from backdoorlab.training.loop import (
    SCHEDULES,
    Callback,
    PerSampleLoss,
    TrainConfig,
    TrainHistory,
    per_sample_loss,
    predict,
    predict_logits,
    resolve_device,
    to_float,
    train,
)

__all__ = [
    "SCHEDULES",
    "Callback",
    "PerSampleLoss",
    "TrainConfig",
    "TrainHistory",
    "per_sample_loss",
    "predict",
    "predict_logits",
    "resolve_device",
    "to_float",
    "train",
]
