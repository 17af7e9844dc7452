"""MCR (Zhao et al. 2020): mode connectivity repair. Connect the suspect model and a fine-tuned copy
of it by a curve in weight space trained on the trusted split, and deploy the model at a point of
the curve away from both ends: where the ends lie in different basins, the curve's inside is trained
on clean data only and loses the backdoor."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim.swa_utils import update_bn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import REPAIRS, DefenseContext, DefenseOutcome, Repair
from backdoorlab.defenses.fine_tuning import FineTuning
from backdoorlab.defenses.post_training import suspect_copy, tuning_recipe
from backdoorlab.options import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt
from backdoorlab.training.callbacks import Callback
from backdoorlab.training.loop import TrainHistory, to_float, train
from backdoorlab.training.steps import PerSampleLoss, plain_step

CurveKind = Literal["bezier", "polychain"]


def curve_coefficients(t: float, points: int, curve: CurveKind = "bezier") -> list[float]:
    """The weights of the curve's ``points`` control points at ``t`` (they sum to 1): the Bernstein
    basis ``C(n-1, k) t^k (1-t)^(n-1-k)`` of a Bezier curve, or the hat functions of a polygonal
    chain through the points (the two curves of the official ``curves.py``, Garipov et al. 2018)."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"a point on the curve needs t in [0, 1], got {t}")
    n = points - 1
    if curve == "bezier":
        return [math.comb(n, k) * t**k * (1.0 - t) ** (n - k) for k in range(points)]
    if curve == "polychain":
        return [max(0.0, 1.0 - abs(t * n - k)) for k in range(points)]
    raise ValueError(f"unknown curve '{curve}'; valid: bezier, polychain")


class _CurvePosition:
    """The point of the curve every weight of a :class:`CurvePath` is computed at (shared)."""

    def __init__(self, points: int, curve: CurveKind) -> None:
        self.points, self.curve = points, curve
        self.t = 0.0
        self.coefficients = curve_coefficients(0.0, points, curve)

    def move(self, t: float) -> None:
        self.t, self.coefficients = t, curve_coefficients(t, self.points, self.curve)


class _CurveWeight(nn.Module):
    """A parametrisation of one weight: its original tensor (the start point, frozen) becomes the
    curve's weight at the shared position, ``c_0 start + sum_j c_j bend_j + c_n end``."""

    def __init__(self, position: _CurvePosition, start: Tensor, end: Tensor, trainable: bool) -> None:
        super().__init__()
        self.position = [position]  # a list: not a submodule
        n = position.points - 1
        # the official init_linear: bend j starts on the straight line, j / n of the way to the end
        self.bends = nn.ParameterList(
            nn.Parameter(torch.lerp(start, end, j / n).detach().clone(), requires_grad=trainable) for j in range(1, n)
        )
        self.register_buffer("end", end.detach().clone())

    def forward(self, start: Tensor) -> Tensor:
        first, *middle, last = self.position[0].coefficients
        weight = first * start + last * self.end
        for c, bend in zip(middle, self.bends, strict=True):
            weight = weight + c * bend
        return weight


class CurvePath:
    """A curve in weight space between two models of one architecture: a copy of ``start`` whose
    every parameter is parametrised as the curve's weight at :attr:`t` (``torch.nn.utils.parametrize``),
    so any model takes one without per-architecture curve layers. The endpoints are fixed; the bends
    (``points - 2`` of them, started on the straight line between the ends) are the copy's only
    trainable parameters. Buffers (batch-norm statistics) are the copy's own, shared by every ``t``."""

    def __init__(self, start: nn.Module, end: nn.Module, points: int = 3, curve: CurveKind = "bezier") -> None:
        if points < 3:
            raise ValueError(f"a curve with bends needs at least 3 points (num_bends), got {points}")
        self.position = _CurvePosition(points, curve)
        self.template = suspect_copy(start)
        self.model = suspect_copy(start)
        ends = dict(end.named_parameters())
        self._weights: list[tuple[str, nn.Module, str]] = []
        for name, parameter in list(self.model.named_parameters()):
            owner_name, _, attribute = name.rpartition(".")
            owner = self.model.get_submodule(owner_name)
            weight = _CurveWeight(self.position, parameter, ends[name], parameter.requires_grad)
            parametrize.register_parametrization(owner, attribute, weight)
            owner.parametrizations[attribute].original.requires_grad_(False)
            self._weights.append((name, owner, attribute))

    @property
    def t(self) -> float:
        return self.position.t

    def move(self, t: float) -> None:
        """Put every weight of :attr:`model` at the curve's point ``t``."""
        self.position.move(t)

    def bends(self) -> list[nn.Parameter]:
        """The trainable bend parameters."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @torch.no_grad()
    def point(self, t: float) -> nn.Module:
        """A plain model (no parametrisation) with the curve's weights at ``t`` and ``start``'s buffers."""
        previous = self.position.t
        self.move(t)
        model = suspect_copy(self.template)
        for name, owner, attribute in self._weights:
            model.get_parameter(name).copy_(getattr(owner, attribute))
        self.move(previous)
        return model


def recompute_batch_norm(model: nn.Module, data: TensorDataset, batch_size: int, device: torch.device) -> nn.Module:
    """Reset ``model``'s batch-norm running statistics and recompute them as the plain average over
    one unaugmented pass of ``data`` (``torch.optim.swa_utils.update_bn``, which is the official
    ``utils.update_bn``); the model is returned in eval mode. A model without batch norm is unchanged."""
    model.to(device)
    batches = [to_float(x.to(device)) for x in data.inputs.split(batch_size)]
    update_bn(batches, model)
    return model.eval()


class _ObservePoint(Callback):
    """After each curve epoch, hands the observer the model at ``t`` (statistics recomputed)."""

    def __init__(self, path: CurvePath, t: float, trusted: TensorDataset, batch_size: int, ctx: DefenseContext):
        self.path, self.t, self.trusted, self.batch_size, self.ctx = path, t, trusted, batch_size, ctx

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        point = recompute_batch_norm(self.path.point(self.t), self.trusted, self.batch_size, self.ctx.device)
        self.ctx.observe(point, epoch + 1)


class _AccumulatedGradients:
    """BackdoorBench's curve gradient: its loop never zeroes the gradient of the model it evaluates,
    so each step hands every bend ``c_j(t)`` times the *sum* of all the steps' gradients at the
    curve's weights so far. Hooks on the bends turn the true per-batch gradient into that."""

    def __init__(self, path: CurvePath) -> None:
        self.sums: dict[int, Tensor] = {}
        for weight in path.model.modules():
            if isinstance(weight, _CurveWeight):
                for j, bend in enumerate(weight.bends):
                    if bend.requires_grad:
                        bend.register_post_accumulate_grad_hook(self._hook(path.position, j + 1))

    def _hook(self, position: _CurvePosition, index: int) -> Callable[[Tensor], None]:
        def hook(bend: Tensor) -> None:
            c = position.coefficients[index]
            if bend.grad is None or c == 0.0:
                return
            at_weight = bend.grad / c  # the gradient at the curve's weight
            total = self.sums.get(id(bend))
            self.sums[id(bend)] = total = at_weight if total is None else total.add_(at_weight)
            bend.grad = c * total

        return hook


@REPAIRS.register(
    "mcr", "MCR (Zhao et al. 2020): a curve from the suspect model to its fine-tuned copy, trained on trusted data"
)
class ModeConnectivityRepair(Repair):
    """Fine-tune a copy of the suspect model on the trusted split (the second endpoint), train a
    quadratic Bezier curve between the suspect model and that copy on the trusted split (endpoints
    fixed, the bend trained, a fresh ``t ~ U(0, 1)`` each batch), then return the model at ``t``
    with its batch-norm statistics recomputed on the trusted split.

    Source: Zhao et al., "Bridging Mode Connectivity in Loss Landscapes and Adversarial Robustness"
    (ICLR 2020); official code ``IBM/model-sanitization`` (``backdoor/backdoor-cifar``: ``train.py``,
    ``curves.py``, ``eval_curve.py``, built on Garipov et al.'s curve code) and BackdoorBench's
    ``defense/mcr.py`` (``config/defense/mcr/cifar10.yaml``: the ``backdoorbench`` preset). The
    official code connects two backdoored models given to it; with one suspect model, the second
    endpoint is the suspect fine-tuned on the trusted split, as BackdoorBench does (its ``ft_*``
    settings are the tuning defaults). The curve's defaults are the official ``train.py``'s.

    Reconstructed: ``t`` = 0.1, BackdoorBench's ``test_t`` (the official code evaluates 61 points
    on test data; no choice is made here, none on test ASR); the loop's cosine rate where the
    official one is piecewise-linear; the weight decay acts on the bend, as BackdoorBench's SGD;
    momentum is Nesterov where the recipe sets it. ``accumulate_gradients`` reproduces
    BackdoorBench's never-zeroed bend gradient. Details and the measurements (one suspect and its
    fine-tuned copy lie in one basin, so ASR stays): docs/defenses.md, "MCR".

    Args:
        t: the point of the curve returned (0 = the suspect model, 1 = its fine-tuned copy).
        epochs, lr, batch_size, weight_decay: the curve's training.
        num_bends: the curve's points, endpoints included (3: one bend, a quadratic Bezier curve).
        curve: ``bezier`` or ``polychain`` (a polygonal chain through the points).
        accumulate_gradients: BackdoorBench's summed bend gradient (see above).
        tuning_epochs, tuning_lr, tuning_batch_size, tuning_weight_decay: the fine-tuning of the
            second endpoint (cosine schedule).
    """

    #: The persistence curve's checkpoints: the model at ``t`` after each epoch of the curve's training.
    checkpoint_unit: ClassVar[str] = "curve epoch"

    def __init__(
        self,
        t: Fraction = 0.1,
        epochs: PositiveInt = 100,
        lr: PositiveFloat = 0.01,
        batch_size: PositiveInt = 128,
        weight_decay: NonNegativeFloat = 1e-4,
        num_bends: PositiveInt = 3,
        curve: CurveKind = "bezier",
        accumulate_gradients: bool = False,
        tuning_epochs: PositiveInt = 100,
        tuning_lr: PositiveFloat = 0.01,
        tuning_batch_size: PositiveInt = 128,
        tuning_weight_decay: NonNegativeFloat = 5e-4,
    ) -> None:
        if num_bends < 3:
            raise ValueError(f"num_bends counts the curve's points with its two ends: at least 3, got {num_bends}")
        curve_coefficients(self._options["t"], self._options["num_bends"], curve)  # fail early

    def repair(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> DefenseOutcome:
        o = self._options
        start = suspect_copy(model).to(ctx.device).eval()
        ctx.observe(start, 0)
        end = suspect_copy(start)
        tuning = FineTuning(
            epochs=o["tuning_epochs"],
            lr=o["tuning_lr"],
            batch_size=o["tuning_batch_size"],
            weight_decay=o["tuning_weight_decay"],
        )
        tuning.tune(end, trusted, replace(ctx, observer=None), description="MCR endpoint")
        path = CurvePath(start, end, o["num_bends"], o["curve"])
        history = self.train_curve(path, trusted, ctx)
        repaired = recompute_batch_norm(path.point(o["t"]), trusted, o["batch_size"], ctx.device)
        return DefenseOutcome(repaired, details={"t": o["t"], "curve_loss": history.loss})

    def train_curve(self, path: CurvePath, trusted: TensorDataset, ctx: DefenseContext) -> TrainHistory:
        """Train ``path``'s bends on ``trusted`` with the run's loop: every batch at a fresh
        ``t ~ U(0, 1)`` drawn from the loop's generator. Returns the loop's history."""
        o = self._options
        if o["accumulate_gradients"]:
            _AccumulatedGradients(path)

        def step(
            model: nn.Module,
            x: Tensor,
            y: Tensor,
            loss_fn: PerSampleLoss,
            indices: Tensor,
            epoch: int,
            generator: torch.Generator,
        ) -> tuple[Tensor, Tensor]:
            path.move(float(torch.rand((), generator=generator)))
            return plain_step(model, x, y, loss_fn, indices, epoch, generator)

        config = tuning_recipe(
            ctx.recipe, epochs=o["epochs"], lr=o["lr"], batch_size=o["batch_size"], weight_decay=o["weight_decay"]
        )
        callbacks = [_ObservePoint(path, o["t"], trusted, o["batch_size"], ctx)] if ctx.observer is not None else []
        return train(
            path.model,
            trusted,
            config,
            device=ctx.device,
            seed=ctx.seed,
            callbacks=callbacks,
            step=step,
            description="MCR curve",
        )
