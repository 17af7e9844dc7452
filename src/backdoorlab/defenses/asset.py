"""ASSET (Pan et al. 2023): offset a fresh model's losses between trusted clean data and the poisoned
set, so that poisons end with a loss that clean samples do not reach."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import SAMPLE_FILTERS, DefenseContext, Filtering, SampleFilter, require_classifier
from backdoorlab.defenses.post_training import frozen_copy, shuffled_index_batches
from backdoorlab.defenses.sample_filtering import require_trusted
from backdoorlab.models.classifier import model_device
from backdoorlab.options import OpenFraction, PositiveFloat, PositiveInt
from backdoorlab.progress import progress_bar
from backdoorlab.training.loop import data_init_sample, per_sample_loss, to_float

Threshold = Literal["official", "density", "gmm"]

#: sklearn's ``GaussianMixture`` default ``reg_covar``, added to the variance the official threshold fits.
REG_COVAR = 1e-6


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block under torch's global CPU generator seeded with ``seed``, restored afterwards
    (module initialisers draw from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def fresh_copy(model: nn.Module, data: TensorDataset, seed: int, data_init: bool = True) -> nn.Module:
    """A network of ``model``'s architecture, freshly initialised: a copy with every layer's
    ``reset_parameters`` run (seeded) and, with ``data_init`` (the recipe's), its data-dependent
    initialisation (airbench's whitening) redone on images spread over ``data``, as the training loop does."""
    fresh = copy.deepcopy(model)
    with seeded(seed):
        for module in fresh.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    if data_init and hasattr(fresh, "init_from_data"):
        with torch.no_grad():
            fresh.init_from_data(to_float(data_init_sample(data.inputs)).to(model_device(fresh)))
    return fresh


def _median(values: Tensor) -> Tensor:
    """The median, the two middle values averaged for an even count (numpy's)."""
    ordered = values.flatten().sort().values
    n = len(ordered)
    return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def medcouple(x: Tensor) -> Tensor:
    """The medcouple of a 1-D sample (Brys, Hubert and Struyf 2004), a robust skewness in [-1, 1]:
    the median of ``((x_i - m) + (x_j - m)) / (x_i - x_j)`` over pairs ``x_i >= m >= x_j`` around
    the median ``m``; pairs both tied at ``m`` take -1, 0 or 1 by their order (statsmodels'
    ``medcouple``, which the official code calls). Exact, quadratic in the sample size."""
    z = x.double().flatten().sort().values
    z = z - _median(z)
    upper, lower = z[z >= 0], z[z <= 0]  # ascending: upper's ties at 0 come first, lower's last
    spread, width = upper[:, None] + lower[None, :], upper[:, None] - lower[None, :]
    kernel = spread / width.masked_fill(width == 0, math.inf)
    ties = int((lower == 0).sum())
    if ties:
        order = torch.arange(ties, device=kernel.device)
        i, j = torch.meshgrid(order, order, indexing="ij")
        kernel[:ties, -ties:] = torch.sign(i + j - (ties - 1)).to(kernel.dtype)
    return _median(kernel)


def adjusted_outlyingness(x: Tensor) -> Tensor:
    """Each value's adjusted outlyingness (Hubert and Van der Veeken 2008) as the official
    ``adjusted_outlyingness``: its distance from the median over the distance from the median to
    the skew-adjusted boxplot whisker on its side (whiskers ``1.5 IQR`` out, stretched by
    ``exp(3 MC)`` or ``exp(4 MC)`` on the long side and shrunk on the other by the medcouple ``MC``)."""
    x = x.double()
    median = x.median()  # the lower median, as torch.median in the official code
    q1, q3 = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype, device=x.device))
    mc, iqr = float(medcouple(x)), q3 - q1
    low_exp, high_exp = (-4.0, 3.0) if mc > 0 else (-3.0, 4.0)
    low = q1 - 1.5 * math.exp(low_exp * mc) * iqr
    high = q3 + 1.5 * math.exp(high_exp * mc) * iqr
    return torch.where(x > median, (x - median) / (high - median), (median - x) / (median - low))


def loss_threshold(scores: Tensor, eps: float, rule: Threshold = "official", seed: int = 0) -> float:
    """The score at and above which samples are flagged. ``official`` and ``density`` fit one
    Gaussian (the official ``get_t``: a one-component mixture, so the mean and variance plus
    sklearn's ``reg_covar``) to the scores at or below their lower median and return
    ``mean + sigma * sqrt(-2 ln(eps) * sigma * sqrt(2 pi))`` (``official``, the expression as the
    code writes it) or ``mean + sigma * sqrt(-2 ln(eps * sigma * sqrt(2 pi)))`` (``density``: where
    the fitted density falls to ``eps``, what that expression seems meant to be). ``gmm`` fits two
    Gaussians of one shared variance to all scores and returns the lowest score the high-mean one
    claims (its posterior above one half; with one variance, every higher score too), or infinity
    where it claims none."""
    ordered = scores.double().flatten().sort().values
    if rule == "gmm":
        return _gmm_threshold(ordered, seed)
    lower = ordered[ordered <= ordered[(len(ordered) - 1) // 2]]
    sigma = math.sqrt(float(lower.var(unbiased=False)) + REG_COVAR)
    root = math.sqrt(2.0 * math.pi)
    square = -2.0 * math.log(eps) * sigma * root if rule == "official" else -2.0 * math.log(eps * sigma * root)
    return float(lower.mean()) + sigma * math.sqrt(max(square, 0.0))


def _gmm_threshold(ordered: Tensor, seed: int) -> float:
    """:func:`loss_threshold`'s ``gmm`` rule on ascending scores."""
    from sklearn.mixture import GaussianMixture

    if bool(ordered[0] == ordered[-1]):
        return math.inf  # one value: no second component to claim anything
    x = ordered.numpy().reshape(-1, 1)
    mixture = GaussianMixture(n_components=2, covariance_type="tied", random_state=seed).fit(x)
    claimed = mixture.predict_proba(x)[:, int(mixture.means_.argmax())] > 0.5
    return float(x[claimed, 0].min()) if claimed.any() else math.inf


def separator(features: int, width: int) -> nn.Module:
    """The official ``MLP(hidden_size=128, num_layers=2)``: two ReLU layers and a sigmoid output."""
    return nn.Sequential(
        nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1), nn.Sigmoid()
    )


def separation(poisoned: Tensor, clean: Tensor, o: dict[str, Any], seed: int) -> Tensor:
    """Train a fresh :func:`separator` to output 1 on the ``poisoned`` batch's features and 0 on the
    ``clean`` one's (squared error; alternating steps, each side with its own Adam, as the official
    loop) and return its outputs on ``poisoned``: the samples unlike clean data stand out."""
    with seeded(seed):
        net = separator(poisoned.shape[1], o["separator_width"]).to(poisoned.device)
    sides = [(x, torch.full((len(x),), float(side), device=x.device)) for x, side in ((poisoned, 1), (clean, 0))]
    optimizers = [torch.optim.Adam(net.parameters(), lr=o["separator_lr"]) for _ in sides]
    for _ in range(o["separator_steps"]):
        for (x, target), optimizer in zip(sides, optimizers):
            loss = F.mse_loss(net(x).flatten(), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return net(poisoned).flatten()


@SAMPLE_FILTERS.register(
    "asset",
    "ASSET (Pan et al. 2023): a fresh model offset between trusted clean data and the poisoned set; high loss flagged",
)
class ASSET(SampleFilter):
    """Active Separation via Offset, its supervised-learning procedure. A fresh network of the
    victim's architecture (:func:`fresh_copy`) is trained for ``rounds`` passes over the poisoned
    set, in shuffled batches of ``batch_size``; for each batch:

    1. one Adam step flattening its logits on a batch of the trusted split (the clean *base set*);
    2. a fresh MLP (:func:`separation`) learns to tell the victim's last feature map of the poisoned
       batch from the base batch's; samples above ``outlyingness`` are the ones unlike clean data;
    3. one Adam step maximising the cross-entropy of those samples (skipped under two).

    A sample's score is the fresh network's cross-entropy under its label (eval mode); the samples
    at or above the ``threshold`` rule's cut (:func:`loss_threshold`) are flagged.

    Source: Pan, Zeng, Lyu, Lin and Jia, "ASSET: Robust Backdoor Data Detection Across a
    Multiplicity of Deep Learning Paradigms" (USENIX Security 2023); official code
    ``ruoxi-jia-group/ASSET`` (``ASSET_demo.ipynb``, ``new_poi_util.py``: the defaults); BackdoorBench
    ``detection_pretrain/asset.py``. Stated: the base set is the trusted split; eval mode throughout;
    ``threshold="official"`` is ``get_t`` as written, ``density`` and ``gmm`` ours (docs/defenses.md).

    Args:
        rounds: passes over the poisoned set.
        batch_size: poisoned samples per step (and base samples, at most the trusted split).
        lr: Adam's learning rate for both offset steps.
        separator_steps: alternating step pairs of the separating MLP per batch.
        separator_lr: its Adam learning rate.
        separator_width: its hidden width.
        outlyingness: the adjusted outlyingness above which a sample's loss is maximised.
        eps: the ``eps`` of the ``official`` and ``density`` thresholds.
        threshold: how the flagging threshold is set on the scores (:func:`loss_threshold`):
            ``official``, ``density`` or ``gmm``.
    """

    uses_trusted: ClassVar[bool] = True

    def __init__(
        self,
        rounds: PositiveInt = 1,
        batch_size: PositiveInt = 512,
        lr: PositiveFloat = 1e-4,
        separator_steps: PositiveInt = 100,
        separator_lr: PositiveFloat = 1e-4,
        separator_width: PositiveInt = 128,
        outlyingness: PositiveFloat = 2.0,
        eps: OpenFraction = 1e-6,
        threshold: Threshold = "official",
    ) -> None:
        super().__init__()

    def filter(
        self, model: nn.Module, data: TensorDataset, ctx: DefenseContext, trusted: TensorDataset | None = None
    ) -> Filtering:
        trusted = require_trusted(trusted, "ASSET")
        require_classifier(model, "ASSET")
        victim = frozen_copy(model).to(ctx.device)
        offset = fresh_copy(model, data, ctx.seed, ctx.recipe.data_init).to(ctx.device)
        counts = self.offset(offset, victim, data, trusted, ctx)
        scores = per_sample_loss(offset, data, device=ctx.device, amp=False)
        o = self._options
        threshold = loss_threshold(scores, o["eps"], o["threshold"], ctx.seed)
        details: dict[str, Any] = {
            "loss_threshold": threshold,
            "ascent_steps": len(counts),
            "mean_selected": sum(counts) / len(counts) if counts else 0.0,
        }
        if not counts:
            details["warnings"] = [
                "no batch had two samples standing out from the trusted data: the loss was never raised on "
                "the poisoned set, so the scores only reflect the offset on clean data"
            ]
        return Filtering(scores, scores >= threshold, details)

    def offset(
        self,
        offset: nn.Module,
        victim: nn.Module,
        data: TensorDataset,
        trusted: TensorDataset,
        ctx: DefenseContext,
    ) -> list[int]:
        """Train ``offset`` in place (see the class), the separator reading ``victim``'s features;
        return how many samples each loss-raising step took."""
        o = self._options
        device = ctx.device
        generator = torch.Generator().manual_seed(ctx.seed)
        inputs, labels = data.inputs.to(device), data.labels.to(device)
        base_inputs = trusted.inputs.to(device)

        def features(x: Tensor) -> Tensor:  # the victim's last feature map, flattened (eval mode)
            with torch.no_grad():
                return victim.forward_features(x).flatten(1).float()

        lower = torch.optim.Adam(offset.parameters(), lr=o["lr"])
        raise_ = torch.optim.Adam(offset.parameters(), lr=o["lr"])
        offset.train()
        counts: list[int] = []
        step = 0
        for _ in progress_bar(range(o["rounds"]), "ASSET rounds"):
            for index in shuffled_index_batches(len(data), o["batch_size"], generator, device):
                step += 1
                base = torch.randperm(len(trusted), generator=generator)[: o["batch_size"]].to(device)
                x, x_base = to_float(inputs[index]), to_float(base_inputs[base])
                flatness = offset(x_base).var(dim=1).mean()
                lower.zero_grad()
                flatness.backward()
                lower.step()
                standing_out = separation(features(x), features(x_base), o, ctx.seed + step)
                chosen_in_batch = (adjusted_outlyingness(standing_out) > o["outlyingness"]).nonzero().flatten()
                if len(chosen_in_batch) < 2:
                    continue
                loss = -F.cross_entropy(offset(x[chosen_in_batch]), labels[index[chosen_in_batch]])
                raise_.zero_grad()
                loss.backward()
                raise_.step()
                counts.append(len(chosen_in_batch))
        return counts
