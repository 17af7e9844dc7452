"""Caption templates: CLIP's prompt ensemble for CIFAR-10 (Radford et al. 2021, ``data/prompts.md``
of ``openai/CLIP``), used to caption classification data and to build zero-shot classifiers."""

from __future__ import annotations

#: The 18 CIFAR-10 templates of CLIP's prompt-engineering notes.
CLIP_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)


def class_text(name: str) -> str:
    """A class name as it goes into a caption (``Speed limit (20km/h)`` stays as is; ``5`` becomes
    ``the number 5``, since a bare digit makes a poor caption)."""
    return f"the number {name}" if name.isdigit() else name


def caption(template: str, name: str) -> str:
    """``template`` filled with the class name ``name``."""
    return template.format(class_text(name))
