"""Pruning batch-norm channels that stand out from their layer (Zheng et al. 2022): CLP, by each
channel's Lipschitz upper bound (data-free), BNP, by how far the training statistics stored in BN
lie from the trusted clean data's, and EP, by the entropy of its pre-activations on the training
data."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import REPAIRS, DefenseContext, DefenseOutcome, Repair
from backdoorlab.defenses.post_training import suspect_copy
from backdoorlab.options import NonNegativeFloat, PositiveInt
from backdoorlab.training.loop import BatchAugmentation, to_float


@torch.no_grad()
def channel_lipschitz(conv: _ConvNd, norm: _BatchNorm) -> Tensor:
    """The upper bound of each output channel's Lipschitz constant through ``conv`` then ``norm``:
    the spectral norm of the channel's kernel, reshaped to ``(in_channels, kernel elements)``,
    scaled by ``|gamma / sqrt(running_var)|`` (the official code's, without BN's eps)."""
    assert norm.running_var is not None
    scale = 1.0 / norm.running_var.sqrt()
    if norm.weight is not None:
        scale = scale * norm.weight
    kernels = conv.weight.detach().float().reshape(conv.out_channels, conv.weight.shape[1], -1)
    return torch.linalg.matrix_norm(kernels * scale.abs().float()[:, None, None], ord=2)


def conv_norm_pairs(model: nn.Module) -> list[tuple[str, _ConvNd, _BatchNorm]]:
    """Each batch-norm layer (with running statistics) and the convolution registered last before
    it, as the official code pairs them (module order), where the two have the same channel count."""
    pairs, conv = [], None
    for name, module in model.named_modules():
        if isinstance(module, _ConvNd):
            conv = module
        elif isinstance(module, _BatchNorm) and module.running_var is not None:
            if conv is not None and conv.out_channels == module.num_features:
                pairs.append((name, conv, module))
    return pairs


def outliers(values: Tensor, u: float) -> Tensor:
    """Indices of the ``values`` above ``mean + u * std`` (unbiased) of them all."""
    return (values > values.mean() + u * values.std()).nonzero().flatten()


def zero_channels(norm: _BatchNorm, index: Tensor, bias: bool = True) -> None:
    """Switch channels ``index`` of ``norm`` off: its weight and (with ``bias``) bias there set to zero."""
    with torch.no_grad():
        for parameter in (norm.weight, norm.bias if bias else None):
            if parameter is not None:
                parameter[index.to(parameter.device)] = 0.0


def prune_outlying_channels(scored: list[tuple[str, _BatchNorm, Tensor]], u: float) -> dict[str, Any]:
    """For each ``(name, norm, per-channel score)``, switch off the channels whose score lies above
    ``mean + u * std`` of their layer's; returns the details both pruners report."""
    pruned: dict[str, int] = {}
    for name, norm, scores in scored:
        index = outliers(scores, u)
        zero_channels(norm, index)
        pruned[name] = len(index)
    return {
        "pruned_channels": sum(pruned.values()),
        "pruned_by_layer": pruned,
        "channels": sum(norm.num_features for _, norm, _ in scored),
    }


def norm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The batch-norm layers of ``model`` that keep running statistics, or a ``ValueError``."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.running_var is not None]
    if not layers:
        raise ValueError(f"this repair prunes batch-norm channels; {type(model).__name__} has no batch normalisation")
    return layers


@REPAIRS.register(
    "clp", "CLP (Zheng et al. 2022): data-free pruning of channels with an outlying Lipschitz upper bound"
)
class ChannelLipschitzPruning(Repair):
    """For every convolution followed by batch normalisation, bound each output channel's Lipschitz
    constant (:func:`channel_lipschitz`) and prune the channels above ``mean + u * std`` of their
    layer (the BN's weight and bias set to zero): a backdoor's trigger features are amplified by a
    few channels. Uses no data. Source: Zheng et al., "Data-free Backdoor Removal based on Channel
    Lipschitzness" (ECCV 2022); official code ``rkteddy/channel-Lipschitzness-based-pruning``
    (``CLP``); BackdoorBench's ``defense/clp.py`` (``config/defense/clp``: ``u`` 3, the paper's
    CIFAR-10 value).

    Pairing follows the official code: a BN layer goes with the convolution registered last before
    it (in a pre-activation block that is the previous block's last convolution); where the two have
    different channel counts (the official code would fail) the BN is left alone and named in
    ``details["unpaired"]``. Convolutions of series models (``Conv1d`` + ``BatchNorm1d``) are
    pruned the same way (reconstructed: the paper has images only). A model without any
    convolution-BN pair is refused.

    Args:
        u: how many standard deviations above its layer's mean a channel's bound must lie to be pruned.
    """

    def __init__(self, u: NonNegativeFloat = 3.0) -> None:
        super().__init__()

    def check_trusted(self, trusted: TensorDataset) -> None:
        """Data-free: any trusted split, even an empty one, will do."""

    def repair(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> DefenseOutcome:
        model = suspect_copy(model)
        pairs = conv_norm_pairs(model)
        if not pairs:
            raise ValueError(
                f"CLP prunes channels of convolutions followed by batch normalisation; {type(model).__name__} has none"
            )
        norms = {id(norm) for _, _, norm in pairs}
        unpaired = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and id(m) not in norms]
        scored = [(name, norm, channel_lipschitz(conv, norm)) for name, conv, norm in pairs]
        details = prune_outlying_channels(scored, self._options["u"])
        return DefenseOutcome(model, details={**details, "unpaired": unpaired})


@torch.no_grad()
def input_statistics(
    model: nn.Module, layers: list[tuple[str, _BatchNorm]], inputs: Tensor, device: torch.device
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per channel, the mean and (unbiased) variance of what each of ``layers`` receives when
    ``model`` (eval mode) reads ``inputs``, over samples and positions, accumulated exactly in batches."""
    sums: dict[str, list[Tensor]] = {}

    def hook(name: str):  # noqa: ANN202
        def record(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().double().transpose(0, 1).flatten(1)  # (channels, values)
            parts = [x.shape[1], x.sum(1), (x * x).sum(1)]
            sums[name] = parts if name not in sums else [a + b for a, b in zip(sums[name], parts, strict=True)]

        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers]
    was_training = model.training
    model.to(device).eval()
    try:
        for chunk in inputs.split(256):
            model(to_float(chunk.to(device)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    out = {}
    for name, (count, total, squares) in sums.items():
        mean = total / count
        out[name] = mean.float().cpu(), ((squares - count * mean * mean) / (count - 1)).float().cpu()
    return out


@REPAIRS.register(
    "bnp", "BNP (Zheng et al. 2022): prune BN channels whose stored statistics lie far from the trusted data's"
)
class BatchNormPruning(Repair):
    """For every batch-norm layer, compare each channel's stored running statistics (learnt on the
    poisoned training set) with the statistics of its input on the trusted clean split, by the KL
    divergence ``log(v_run / v_clean) + (v_clean + (m_clean - m_run)^2) / (2 v_run) - 1/2``, and
    prune the channels above ``mean + u * std`` of their layer (weight and bias set to zero): neurons
    that the trigger drives have training statistics that clean data does not reproduce. Source:
    Zheng et al., "Pre-activation Distributions Expose Backdoor Neurons" (NeurIPS 2022), official
    code ``RJ-T/NIPS2022_EP_BNP``; BackdoorBench's ``defense/bnp.py`` (``config/defense/bnp``: ``u`` 3).

    The clean statistics are over the whole trusted split (the official code reads one batch);
    BackdoorBench's ``bnp_defense`` overwrites them with a batch of the *poisoned training set*
    before comparing (its second forward pass, which BatchNorm2d_MBNS also records), which is not
    copied: the defender's clean data is what the paper compares against.

    Args:
        u: how many standard deviations above its layer's mean a channel's divergence must lie.
        min_trusted: the fewest trusted samples it runs on (the statistics of fewer are noise).
    """

    def __init__(self, u: NonNegativeFloat = 3.0, min_trusted: PositiveInt = 16) -> None:
        super().__init__()

    def check_trusted(self, trusted: TensorDataset) -> None:
        if len(trusted) < self._options["min_trusted"]:
            raise ValueError(
                f"BNP estimates clean batch-norm statistics from the trusted split: it has {len(trusted)} samples, "
                f"fewer than min_trusted={self._options['min_trusted']}; raise --trusted-size"
            )

    def repair(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> DefenseOutcome:
        model = suspect_copy(model)
        layers = norm_layers(model)
        clean = input_statistics(model, layers, trusted.inputs, ctx.device)
        scored = []
        for name, norm in layers:
            mean, var = clean[name]
            run_mean, run_var = norm.running_mean.float().cpu(), norm.running_var.float().cpu()
            divergence = (run_var / var).log() + (var + (mean - run_mean) ** 2) / (2 * run_var) - 0.5
            scored.append((name, norm, divergence))
        return DefenseOutcome(model, details=prune_outlying_channels(scored, self._options["u"]))


def histogram_entropy(values: Tensor, step: float = 0.1) -> Tensor:
    """The entropy (nats) of each row of ``values`` binned into bins of width ``step`` laid from
    the smallest value of all rows, as EP's official code bins them: a value on a bin's edge
    (the smallest one among them) falls in no bin."""
    low, bins = values.min(), int((values.max() - values.min()) / step)
    entropy = torch.zeros(values.shape[0], dtype=values.dtype)
    for n in range(bins):
        share = ((values > low + n * step) & (values < low + (n + 1) * step)).sum(-1) / values.shape[-1]
        entropy -= share * share.log().nan_to_num(0.0)
    return entropy


@torch.no_grad()
def channel_maxima(model: nn.Module, layers: list[tuple[str, _BatchNorm]], inputs: Tensor) -> dict[str, Tensor]:
    """Per layer, what each channel receives at its strongest position for each input:
    ``(channels, inputs)``, from one forward pass of ``inputs`` (floats on the model's device) in
    eval mode."""
    maxima: dict[str, Tensor] = {}

    def hook(name: str):  # noqa: ANN202
        def record(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().float()
            maxima[name] = x.reshape(x.shape[0], x.shape[1], -1).amax(-1).T.cpu()

        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers]
    try:
        model.eval()(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


@REPAIRS.register(
    "ep",
    "EP (Zheng et al. 2022): prune BN channels whose pre-activations on the training data have outlying low entropy",
)
class EntropyPruning(Repair):
    """Feed one batch of the training set the suspect model learnt from (poisoned, without its
    mask) through the model; for every batch-norm layer take each channel's input at its strongest
    position per sample, standardise it per channel over the batch, and prune the channels whose
    histogram entropy lies below ``mean - u * std`` of their layer's (BN weight and bias set to
    zero): a backdoor neuron's pre-activations split into a clean mode and a triggered one, a
    lower-entropy shape than a clean neuron's. Source: Zheng et al., "Pre-activation Distributions
    Expose Backdoor Neurons" (NeurIPS 2022), official code ``RJ-T/NIPS2022_EP_BNP``; BackdoorBench's
    ``defense/ep.py`` (``EP_defense``, ``batch_entropy`` with bins of 0.1; ``config/defense/ep``:
    ``u`` 3, ``batch_size`` 256, its loader shuffling the poisoned training set under the training
    transform).

    The batch is drawn with the run's seed and takes the recipe's training augmentation, as
    BackdoorBench's loader does. BackdoorBench's ``u_min`` / ``u_max`` / ``u_num`` sweep reports
    every ``u`` on the test set and is not copied. LayerNorm layers (which BackdoorBench also prunes
    in ConvNeXt and ViT) are not: the registered models normalise with batch norm. Series models'
    BatchNorm1d channels are pruned the same way (reconstructed: the paper has images only). A
    channel whose input is constant over the batch (which the official code cannot standardise) is
    given its layer's mean entropy, so it is never pruned (reconstructed).

    Args:
        u: how many standard deviations below its layer's mean a channel's entropy must lie.
        batch_size: the training samples read (one batch).
    """

    reads = "training"

    def __init__(self, u: NonNegativeFloat = 3.0, batch_size: PositiveInt = 256) -> None:
        super().__init__()

    def check_trusted(self, trusted: TensorDataset) -> None:
        """Reads the training set, not the trusted split: any trusted split will do."""

    def repair(self, model: nn.Module, trusted: TensorDataset, ctx: DefenseContext) -> DefenseOutcome:
        data = trusted  # the training set: ``reads = "training"``
        model = suspect_copy(model).to(ctx.device)
        layers = norm_layers(model)
        generator = torch.Generator().manual_seed(ctx.seed)
        index = torch.randperm(len(data), generator=generator)[: self._options["batch_size"]]
        augment = BatchAugmentation(ctx.recipe, data, generator, ctx.device)
        inputs = augment(data.inputs[index].to(ctx.device), index.to(ctx.device), epoch=0)
        maxima = channel_maxima(model, layers, inputs)
        scored = []
        for name, norm in layers:
            feats, spread = maxima[name], maxima[name].std(-1, keepdim=True)
            entropy = histogram_entropy((feats - feats.mean(-1, keepdim=True)) / spread.clamp_min(1e-12))
            constant = spread.flatten() == 0
            if constant.any() and not constant.all():  # no distribution to judge: the layer's mean
                entropy[constant] = entropy[~constant].mean()
            scored.append((name, norm, -entropy))
        details = prune_outlying_channels(scored, self._options["u"])
        return DefenseOutcome(model, details={**details, "batch": len(index)})
