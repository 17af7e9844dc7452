"""Zero-shot evaluation of image-text models: clean accuracy with a prompt ensemble, attack success
rate, and retrieval ASR."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from backdoorlab.attacks.triggers import Trigger
from backdoorlab.clip.models import ClipModel, evaluating
from backdoorlab.clip.pairs import ImageTextPairs
from backdoorlab.clip.templates import CLIP_TEMPLATES, caption, class_text


@torch.inference_mode()
def embed_images(model: ClipModel, images: Tensor, batch_size: int = 500) -> Tensor:
    """Normalised image embeddings of a uint8 batch, in chunks."""
    device = model.image_mean.device
    with evaluating(model):
        return torch.cat(
            [model.encode_image(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
        )


@torch.inference_mode()
def zero_shot_classifier(model: ClipModel, classes: Sequence[str], templates: Sequence[str] = CLIP_TEMPLATES) -> Tensor:
    """One weight per class ``(C, D)``: the normalised mean of its template captions' normalised
    embeddings (CLIP's prompt ensembling)."""
    with evaluating(model):
        weights = [model.encode_text([caption(t, name) for t in templates]).mean(dim=0) for name in classes]
    return torch.nn.functional.normalize(torch.stack(weights), dim=-1)


def zero_shot_predict(model: ClipModel, images: Tensor, classifier: Tensor) -> Tensor:
    """Predicted class of each image (CPU int64)."""
    return (embed_images(model, images) @ classifier.T).argmax(dim=1).cpu()


def evaluate_zero_shot(
    model: ClipModel,
    test: ImageTextPairs,
    trigger: Trigger | None = None,
    target: int = 0,
    *,
    templates: Sequence[str] = CLIP_TEMPLATES,
    retrieval: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Clean zero-shot accuracy (CA) on labelled ``test`` pairs; with a trigger, the attack success
    rate (ASR: the share of triggered images of the other classes classified as ``target``; PAR's
    code also counts target-class images, which only raises ASR by their share) and, with
    ``retrieval``, retrieval ASR (the share of triggered images whose top-5 captions among the test
    captions name the target class)."""
    if not test.classes or bool((test.labels < 0).any()):
        raise ValueError(f"{test.name}: zero-shot evaluation needs labelled pairs")
    classifier = zero_shot_classifier(model, test.classes, templates)
    result = {"ca": float((zero_shot_predict(model, test.images, classifier) == test.labels).float().mean())}
    if trigger is not None:
        others = test.labels != target
        triggered = trigger(test.images[others], torch.Generator().manual_seed(seed + 1))
        embeddings = embed_images(model, triggered)
        result["asr"] = float(((embeddings @ classifier.T).argmax(dim=1).cpu() == target).float().mean())
        if retrieval:
            pool = sorted(set(test.captions))
            with torch.inference_mode(), evaluating(model):
                texts = torch.cat([model.encode_text(pool[i : i + 500]) for i in range(0, len(pool), 500)])
            top = (embeddings @ texts.T).topk(min(5, len(pool)), dim=1).indices.cpu()
            name = class_text(test.classes[target])
            names_target = torch.tensor([name in text for text in pool])
            result["retrieval_asr"] = float(names_target[top].any(dim=1).float().mean())
    return result
