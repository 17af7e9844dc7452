"""Read image-classification parquet files in the Hugging Face ``datasets`` layout.

Layout: ``<root>/<name>/{train,test}.parquet``, column ``image`` a struct ``{bytes, path}`` of encoded
image files, column ``label`` int64; class names in the schema's ``huggingface`` metadata
(``ClassLabel``). Decoded tensors are cached (see :mod:`backdoorlab.data.cache`) so the images are
decoded once per file, not on every run.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import Tensor

from backdoorlab.data.dataset import DataError
from backdoorlab.progress import progress_bar


def _class_names(schema: pa.Schema, path: Path) -> tuple[str, ...] | None:
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta is None:
        return None
    try:
        names = json.loads(meta)["info"]["features"]["label"]["names"]
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: unreadable 'huggingface' class-label metadata ({err})") from err
    return tuple(str(n) for n in names)


def read_image_parquet(path: Path) -> tuple[Tensor, Tensor, tuple[str, ...]]:
    """Decode one split file to ``(images uint8 (N, C, H, W), labels int64, class names)``.

    Every error names the file (and the row, for an image that will not decode).
    """
    path = Path(path)
    try:
        table = pq.read_table(path, columns=["image", "label"])
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from err
    except KeyError as err:  # a column is missing
        raise DataError(f"{path}: missing column {err}; expected 'image' and 'label'") from err
    image_type = table.schema.field("image").type
    if not pa.types.is_struct(image_type) or image_type.get_field_index("bytes") < 0:
        raise DataError(f"{path}: column 'image' must be a struct with a 'bytes' field")
    encoded = table.column("image").combine_chunks().field("bytes").to_pylist()
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    if len(encoded) == 0:
        raise DataError(f"{path}: the file holds no rows")

    first = decode_image(encoded[0], path, 0)
    mode = "L" if first.mode in ("L", "1", "I", "I;16") else "RGB"
    out = np.empty((len(encoded), *np.asarray(first.convert(mode)).shape), dtype=np.uint8)
    for i, blob in enumerate(progress_bar(encoded, f"decoding {path.parent.name}/{path.name}")):
        img = decode_image(blob, path, i).convert(mode)
        if img.size != first.size:
            raise DataError(f"{path}: row {i} is {img.size}, the first row is {first.size}")
        out[i] = np.asarray(img)
    images = torch.from_numpy(out)
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    names = _class_names(table.schema, path)
    if names is None:
        names = tuple(str(i) for i in range(int(labels.max()) + 1))
    if labels.min() < 0 or labels.max() >= len(names):
        raise DataError(f"{path}: labels outside 0..{len(names) - 1}")
    return images.contiguous(), labels, names


def decode_image(blob: bytes | None, path: Path, row: int) -> Image.Image:
    """One encoded image of a parquet file; an error names the file and the row."""
    if blob is None:
        raise DataError(f"{path}: row {row} has no image bytes")
    try:
        img = Image.open(io.BytesIO(blob))
        img.load()
    except Exception as err:  # PIL raises many types for corrupt data
        raise DataError(f"{path}: row {row}: cannot decode image ({err})") from err
    return img
