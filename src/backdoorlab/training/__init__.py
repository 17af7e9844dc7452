"""The training loop over tensors, its configuration, hooks and batched inference."""

from backdoorlab.training.callbacks import Callback
from backdoorlab.training.loop import (
    SCHEDULES,
    TrainConfig,
    TrainHistory,
    per_sample_loss,
    predict,
    predict_logits,
    resolve_device,
    to_float,
    train,
)
from backdoorlab.training.steps import PerSampleLoss, TrainStep, plain_step

__all__ = [
    "SCHEDULES",
    "Callback",
    "PerSampleLoss",
    "TrainConfig",
    "TrainHistory",
    "TrainStep",
    "per_sample_loss",
    "plain_step",
    "predict",
    "predict_logits",
    "resolve_device",
    "to_float",
    "train",
]
