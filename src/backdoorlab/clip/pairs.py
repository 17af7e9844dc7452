"""Image-text pairs: captioned classification data, caption files, and their poisoning.

Images are uint8 ``(N, 3, H, W)`` as everywhere in backdoorlab; captions are strings. Pairs made from
a labelled dataset keep the labels (for zero-shot evaluation and for choosing which pairs to poison);
pairs read from a caption file have labels -1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from backdoorlab.attacks.triggers import Trigger
from backdoorlab.clip.templates import CLIP_TEMPLATES, caption
from backdoorlab.data.dataset import DataError, TensorDataset, resolve_count
from backdoorlab.data.parquet import decode_image
from backdoorlab.progress import progress_bar


@dataclass(frozen=True)
class ImageTextPairs:
    """Pairs of an image and its caption.

    Attributes:
        images: uint8 ``(N, 3, H, W)``.
        captions: one caption per image.
        labels: int64 ``(N,)`` class of each image, or -1 where unknown (caption files).
        classes: class names (empty for caption files).
        name: where the pairs come from.
    """

    images: Tensor
    captions: tuple[str, ...]
    labels: Tensor
    classes: tuple[str, ...] = ()
    name: str = "pairs"

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise DataError(
                f"{self.name}: images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if not (len(self.captions) == len(self.images) == len(self.labels)):
            raise DataError(
                f"{self.name}: {len(self.images)} images, {len(self.captions)} captions and {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, indices: Tensor) -> ImageTextPairs:
        idx = indices.tolist()
        return replace(
            self,
            images=self.images[indices],
            captions=tuple(self.captions[i] for i in idx),
            labels=self.labels[indices],
        )


def rgb(images: Tensor) -> Tensor:
    """Grey images ``(N, 1, H, W)`` repeated to three channels (image-text models take RGB)."""
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def pairs_from_dataset(
    data: TensorDataset, *, templates: Sequence[str] = CLIP_TEMPLATES, seed: int = 0
) -> ImageTextPairs:
    """Caption every image of a classification dataset with a template drawn at random (seeded)
    and filled with its class name, as CLIP's prompt ensembles do."""
    if data.modality != "image":
        raise DataError(f"{data.name}: image-text pairs need image data, got {data.modality}")
    generator = torch.Generator().manual_seed(seed)
    choice = torch.randint(len(templates), (len(data),), generator=generator).tolist()
    captions = tuple(caption(templates[t], data.classes[y]) for t, y in zip(choice, data.labels.tolist()))
    return ImageTextPairs(rgb(data.inputs), captions, data.labels.clone(), data.classes, data.name)


def read_caption_parquet(
    path: str | Path, *, image_size: int = 64, caption_column: str | None = None
) -> ImageTextPairs:
    """Read a captions file in the Hugging Face layout: an ``image`` column (a struct with ``bytes``,
    or raw bytes) and a caption column (``caption``, ``text`` or ``sentences``; a list of captions
    gives one pair per caption, as COCO's five). Images are resized (shorter side) and centre-cropped
    to ``image_size``. Errors name the file, and the row for an image that will not decode."""
    from PIL import Image

    path = Path(path)
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from err
    names = schema.names
    column = caption_column or next((c for c in ("caption", "text", "sentences", "captions") if c in names), None)
    if "image" not in names or column is None or column not in names:
        raise DataError(
            f"{path}: needs an 'image' column and a caption column (caption, text, sentences); has {', '.join(names)}"
        )
    table = pq.read_table(path, columns=["image", column])
    images_col = table.column("image").combine_chunks()
    if pa.types.is_struct(images_col.type):
        if images_col.type.get_field_index("bytes") < 0:
            raise DataError(f"{path}: column 'image' is a struct without a 'bytes' field")
        images_col = images_col.field("bytes")
    blobs = images_col.to_pylist()
    texts = table.column(column).to_pylist()
    if not blobs:
        raise DataError(f"{path}: the file holds no rows")
    images: list[np.ndarray] = []
    captions: list[str] = []
    for row, (blob, text) in enumerate(progress_bar(list(zip(blobs, texts)), f"decoding {path.name}")):
        img = decode_image(blob, path, row).convert("RGB")
        scale = image_size / min(img.size)
        img = img.resize(
            (max(image_size, round(img.width * scale)), max(image_size, round(img.height * scale))), Image.BICUBIC
        )
        left, top = (img.width - image_size) // 2, (img.height - image_size) // 2
        array = np.asarray(img.crop((left, top, left + image_size, top + image_size)))
        for text_item in text if isinstance(text, list) else [text]:
            if not isinstance(text_item, str) or not text_item.strip():
                raise DataError(f"{path}: row {row} has an empty or non-text caption ({text_item!r})")
            images.append(array)
            captions.append(text_item.strip())
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return ImageTextPairs(stacked, tuple(captions), torch.full((len(captions),), -1, dtype=torch.int64), (), path.stem)


@dataclass(frozen=True)
class PoisonedPairs:
    """Poisoned pairs and the hidden mask of which were poisoned (for evaluation only)."""

    pairs: ImageTextPairs
    mask: Tensor


def poison_pairs(
    pairs: ImageTextPairs,
    trigger: Trigger,
    *,
    rate: float | int,
    target: int,
    templates: Sequence[str] = CLIP_TEMPLATES,
    seed: int = 0,
) -> PoisonedPairs:
    """Put the trigger on a ``rate`` of the pairs (a fraction or a count) and replace their captions
    by a template drawn at random and filled with the target class name, as PAR's
    ``create_backdoor_data.py`` (and BadCLIP/CleanCLIP) do. Pairs of the target class are not chosen
    when labels are known."""
    if not pairs.classes:
        raise DataError(f"{pairs.name}: poisoning needs class names for the target caption")
    if not 0 <= target < len(pairs.classes):
        raise DataError(f"target class {target} is outside 0..{len(pairs.classes) - 1}")
    generator = torch.Generator().manual_seed(seed)
    candidates = (pairs.labels != target).nonzero().squeeze(1)
    count = 0 if rate == 0 else resolve_count(rate, len(pairs), "poison rate")  # of all pairs, as for images
    if count > len(candidates):
        raise DataError(
            f"poison rate {rate} asks for {count} pairs but only {len(candidates)} are outside the target class"
        )
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]].sort().values
    images = pairs.images.clone()
    if count:
        images[chosen] = trigger(pairs.images[chosen], generator)
    captions = list(pairs.captions)
    for index, template in zip(chosen.tolist(), torch.randint(len(templates), (count,), generator=generator).tolist()):
        captions[index] = caption(templates[template], pairs.classes[target])
    mask = torch.zeros(len(pairs), dtype=torch.bool)
    mask[chosen] = True
    return PoisonedPairs(replace(pairs, images=images, captions=tuple(captions)), mask)
