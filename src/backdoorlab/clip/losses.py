"""The image-text objectives: CLIP's contrastive loss, CleanCLIP's and PAR's.

All take L2-normalised embeddings ``(B, D)`` and the (already exponentiated) logit scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: PAR's threshold on the batch-mean squared distance (``--loss-thresh`` of nmndeep/PerturbAndRecover).
PAR_THRESHOLD = 2.15


def clip_loss(image: Tensor, text: Tensor, scale: float | Tensor) -> Tensor:
    """Symmetric InfoNCE over the batch (Radford et al. 2021): the i-th image and caption match."""
    logits = scale * image @ text.T
    labels = torch.arange(len(image), device=image.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def inmodal_loss(anchor: Tensor, augmented: Tensor, scale: float | Tensor) -> Tensor:
    """CleanCLIP's self-supervised term for one modality: each item against the augmented copies of
    the batch, its own copy the positive (one direction, as ``nishadsinghi/CleanCLIP`` ``src/train.py``)."""
    labels = torch.arange(len(anchor), device=anchor.device)
    return F.cross_entropy(scale * anchor @ augmented.T, labels)


def cleanclip_loss(
    image: Tensor,
    text: Tensor,
    image_aug: Tensor,
    text_aug: Tensor,
    scale: float | Tensor,
    clip_weight: float = 1.0,
    inmodal_weight: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """CleanCLIP (Bansal et al. 2023): ``λ1·L_CLIP + λ2·½(L_SS(image) + L_SS(text))``, both weights 1
    (``--clip_weight``, ``--inmodal_weight``)."""
    contrastive = clip_loss(image, text, scale)
    inmodal = 0.5 * (inmodal_loss(image, image_aug, scale) + inmodal_loss(text, text_aug, scale))
    loss = clip_weight * contrastive + inmodal_weight * inmodal
    return loss, {"clip": float(contrastive.detach()), "inmodal": float(inmodal.detach())}


def squared_distance(a: Tensor, b: Tensor) -> Tensor:
    """Batch mean of the squared L2 distance between rows (PAR's ``compute_loss('l2', reduction='mean')``)."""
    return (a - b).pow(2).sum(dim=1).mean()


def par_loss(
    image: Tensor,
    text: Tensor,
    image_ref: Tensor,
    text_ref: Tensor,
    scale: float | Tensor,
    threshold: float = PAR_THRESHOLD,
) -> tuple[Tensor, dict[str, float]]:
    """Perturb-and-Recover (Singh, Croce, Hein 2024; ``losses.py`` of nmndeep/PerturbAndRecover):
    ``L_CLIP − ½(1[S_img ≤ τ]·S_img + 1[S_txt ≤ τ]·S_txt)``, S the batch-mean squared distance between
    the embeddings of the model being cleaned and of the frozen poisoned model (``*_ref``). A term
    switches off once its batch mean exceeds τ (a hard indicator on the mean, as the code)."""
    contrastive = clip_loss(image, text, scale)
    s_image, s_text = squared_distance(image, image_ref), squared_distance(text, text_ref)
    push = 0.5 * (torch.where(s_image <= threshold, s_image, 0.0) + torch.where(s_text <= threshold, s_text, 0.0))
    return contrastive - push, {
        "clip": float(contrastive.detach()),
        "s_image": float(s_image.detach()),
        "s_text": float(s_text.detach()),
    }
