"""Masks over batch-norm neurons, learnt and then thresholded: what ANP and RNP share. A mask (and,
for ANP, an adversarial perturbation) is a parametrisation of the model's own BN layers, so any
model with affine batch norm takes one without being rebuilt."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from backdoorlab.defenses.channel_pruning import norm_layers, zero_channels


class NeuronMask(nn.Module):
    """One batch-norm layer's mask ``m`` and adversarial noise ``(d, d_b)``: the layer computes with
    weight ``gamma * (m + d)`` and bias ``beta * (1 + d_b)`` while ``perturbed``, else with
    ``gamma * m`` and ``beta`` (the official ``NoisyBatchNorm2d`` of ANP; RNP's ``MaskBatchNorm2d``
    is the unperturbed case)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mask = nn.Parameter(torch.ones(channels))
        self.noise = nn.Parameter(torch.zeros(channels))
        self.noise_bias = nn.Parameter(torch.zeros(channels))
        self.perturbed = False

    def weight(self, gamma: Tensor) -> Tensor:
        return gamma * (self.mask + self.noise if self.perturbed else self.mask)

    def bias(self, beta: Tensor) -> Tensor:
        return beta * (1.0 + self.noise_bias) if self.perturbed else beta


class _Apply(nn.Module):
    """A parametrisation that hands its tensor to one of :class:`NeuronMask`'s maps."""

    def __init__(self, mask: NeuronMask, which: str) -> None:
        super().__init__()
        self.mask, self.which = [mask], which  # a list: not a submodule (no duplicate parameters)

    def forward(self, tensor: Tensor) -> Tensor:
        return getattr(self.mask[0], self.which)(tensor)


def masked(model: nn.Module) -> dict[str, NeuronMask]:
    """Freeze ``model`` (changed in place) and give every affine batch-norm layer a
    :class:`NeuronMask`, whose parameters are then the only trainable ones; returns them by layer
    name (a ``ValueError`` where there is none)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    found = {}
    for name, norm in norm_layers(model):
        if norm.weight is None or norm.bias is None:
            continue
        mask = NeuronMask(norm.num_features).to(norm.weight.device)
        parametrize.register_parametrization(norm, "weight", _Apply(mask, "weight"))
        parametrize.register_parametrization(norm, "bias", _Apply(mask, "bias"))
        found[name] = mask
    if not found:
        raise ValueError(f"this repair masks affine batch-norm neurons; {type(model).__name__} has none")
    return found


@torch.no_grad()
def clip_masks(masks: list[nn.Parameter]) -> None:
    """Clip every mask to ``[0, 1]`` (after each optimiser step, as both official ``clip_mask``)."""
    for mask in masks:
        mask.clamp_(0.0, 1.0)


def prune_masked_neurons(model: nn.Module, masks: dict[str, Tensor], threshold: float) -> dict[str, Any]:
    """Zero the BN weight of every neuron of ``model`` (in place) whose mask is at or below
    ``threshold`` (the bias stays, as both official ``pruning`` functions); returns the details."""
    norms: dict[str, _BatchNorm] = dict(norm_layers(model))
    pruned = {}
    for name, mask in masks.items():
        index = (mask <= threshold).nonzero().flatten()
        zero_channels(norms[name], index, bias=False)
        pruned[name] = len(index)
    values = torch.cat(list(masks.values()))
    return {
        "pruned_channels": sum(pruned.values()),
        "pruned_by_layer": pruned,
        "channels": len(values),
        "mask_quantiles": torch.quantile(values, torch.tensor([0.0, 0.1, 0.5])).tolist(),
    }
