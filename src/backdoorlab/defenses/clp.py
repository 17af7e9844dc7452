"""CLP (Zheng et al. 2022): data-free pruning of channels whose Lipschitz upper bound stands out."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from backdoorlab.data.dataset import TensorDataset
from backdoorlab.defenses.base import REPAIRS, DefenseContext, DefenseOutcome, Repair
from backdoorlab.defenses.post_training import suspect_copy
from backdoorlab.options import NonNegativeFloat


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
        self._options = {"u": float(u)}

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
        pruned: dict[str, int] = {}
        with torch.no_grad():
            for name, conv, norm in pairs:
                bounds = channel_lipschitz(conv, norm)
                index = (bounds > bounds.mean() + self._options["u"] * bounds.std()).nonzero().flatten()
                if norm.weight is not None:
                    norm.weight[index] = 0.0
                if norm.bias is not None:
                    norm.bias[index] = 0.0
                pruned[name] = len(index)
        return DefenseOutcome(
            model,
            details={
                "pruned_channels": sum(pruned.values()),
                "pruned_by_layer": pruned,
                "channels": sum(norm.num_features for _, _, norm in pairs),
                "unpaired": unpaired,
            },
        )
