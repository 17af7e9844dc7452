"""The one model interface every architecture in backdoorlab shares.

``Classifier`` = normalisation -> body -> global pool -> linear head, following timm's split:

- ``forward_features(x)``: the body's last feature map (unpooled), for fine-pruning, NAD,
  activation clustering and other methods that read features;
- ``forward_head(features, pre_logits=False)``: pool and classify (``pre_logits`` gives the pooled
  embedding);
- ``forward(x) = forward_head(forward_features(x))``.

Inputs are float images in [0, 1] (or raw series); normalisation is part of the model, so a saved
model carries its own preprocessing and trigger-inversion methods work in pixel space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Classifier(nn.Module):
    """Normalise, run ``body``, pool globally (mean or max), then a linear head.

    ``shallow_depth``: the number of body modules a shallow head sees (see the attribute)."""

    def __init__(
        self,
        body: nn.Module,
        num_features: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        pool: str = "avg",
        head_bias: bool = True,
        logit_scale: float = 1.0,
        dropout: float = 0.0,
        shallow_depth: int = 2,
    ) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))
        self.body = body
        self.pool = pool
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(num_features, num_classes, bias=head_bias)
        self.logit_scale = logit_scale
        self.num_features = num_features
        self.num_classes = num_classes
        #: How many body modules make the "shallow layers" a second head attaches to (E2ABL): the
        #: first activated feature map. 2 for most bodies (a conv block and its pooling, a stem and
        #: its first stage); builders whose body lists a convolution, its normalisation and its
        #: activation as separate modules set where the activation ends.
        self.shallow_depth = shallow_depth

    def normalize(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(self.normalize(x))

    def forward_body(self, h: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Run body modules ``start:stop`` on ``h`` (``h`` normalised input when ``start`` is 0):
        shallow heads and hidden-state mixing use it. Works for any ``nn.Sequential`` body, also
        subclasses whose constructor slicing could not call."""
        for module in list(self.body)[start:stop]:
            h = module(h)
        return h

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        flat = features.flatten(2)
        pooled = flat.mean(-1) if self.pool == "avg" else flat.amax(-1)
        if pre_logits:
            return pooled
        logits = self.fc(self.dropout(pooled))
        return logits * self.logit_scale if self.logit_scale != 1.0 else logits

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Data-dependent initialisation (airbench's whitening layer); a no-op for most bodies."""
        init = getattr(self.body, "init_from_data", None)
        if init is not None:
            init(self.normalize(x))


def model_device(model: nn.Module) -> torch.device:
    """The device ``model``'s parameters are on (the CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
