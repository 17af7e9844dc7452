"""Image-text (CLIP-style) models: poisoning image-caption pairs, zero-shot evaluation, and cleaning
a poisoned model with fine-tuning, CleanCLIP (Bansal et al. 2023) or Perturb-and-Recover (Singh,
Croce, Hein 2024). See docs/clip.md.

Modules: ``templates`` (CLIP's prompt ensemble), ``pairs`` (captioned data, caption files,
poisoning), ``models`` (the offline ``lit`` model and open_clip), ``losses``, ``augment``,
``training`` (one loop for every objective), ``cleanings`` (the cleaning methods' registry),
``evaluate`` (CA, ASR, retrieval ASR). The CleanCLIP-versus-PAR study is a grid of
``backdoorlab.experiments.clip_study``.
"""

from backdoorlab.clip.cleanings import CLIP_CLEANINGS, Cleaning, create_cleaning
from backdoorlab.clip.evaluate import evaluate_zero_shot, zero_shot_classifier
from backdoorlab.clip.losses import PAR_THRESHOLD, cleanclip_loss, clip_loss, par_loss
from backdoorlab.clip.models import CLIP_MODELS, ClipModel, LiTClip, OpenClip, create_clip_model
from backdoorlab.clip.pairs import ImageTextPairs, PoisonedPairs, pairs_from_dataset, poison_pairs, read_caption_parquet
from backdoorlab.clip.templates import CLIP_TEMPLATES
from backdoorlab.clip.training import CleanClip, ClipTrainConfig, PerturbAndRecover, contrastive, fit_clip

__all__ = [
    "CLIP_CLEANINGS",
    "CLIP_MODELS",
    "CLIP_TEMPLATES",
    "PAR_THRESHOLD",
    "CleanClip",
    "Cleaning",
    "ClipModel",
    "ClipTrainConfig",
    "ImageTextPairs",
    "LiTClip",
    "OpenClip",
    "PerturbAndRecover",
    "PoisonedPairs",
    "cleanclip_loss",
    "clip_loss",
    "contrastive",
    "create_cleaning",
    "create_clip_model",
    "evaluate_zero_shot",
    "fit_clip",
    "pairs_from_dataset",
    "par_loss",
    "poison_pairs",
    "read_caption_parquet",
    "zero_shot_classifier",
]
