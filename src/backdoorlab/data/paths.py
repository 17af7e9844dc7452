"""Datasets by path: ``parquet:PATH``, ``hf:NAME`` and ``folder:PATH``, and the parquet writer an export uses.

- ``parquet:PATH``: parquet files in the Hugging Face ``datasets`` layout. ``PATH`` is a folder
  holding ``train.parquet`` and ``test.parquet`` (or shards ``train-00000-of-00002.parquet``...,
  the same under ``PATH/data/``, or ``PATH/train/*.parquet``; ``validation`` stands in for a
  missing ``test``), or a training file whose test file has the same name with ``test`` for
  ``train``. The image column is the one the ``huggingface`` schema metadata calls ``Image``, else
  the struct ``{bytes, path}`` or binary column (``image``/``img`` where several); the label column
  the ``ClassLabel`` one, else an integer column named ``label``, ``labels``, ``fine_label``,
  ``target``, ``class`` or ``y``. Class names come from ``ClassLabel``, else ``"0".."K-1"``.
- ``hf:NAME``: a dataset the Hugging Face ``datasets`` library loads (a hub name, or a local
  folder of data files), where that library is installed; its splits are read as parquet files are.
- ``folder:PATH``: an image-folder tree ``PATH/{train,test}/<class>/<image file>``; classes are the
  training split's folder names, sorted; any file Pillow reads by its extension is an image.

Every image of a set must have one size (nothing is resized: the error names the file that
differs); grey images are kept as one channel unless some image has colour. Decoded parquet splits
are cached like the registered sets' (:mod:`backdoorlab.data.cache`). A relative ``PATH`` is taken
from the current folder, else from the data root.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import Tensor

from backdoorlab.data.cache import cached
from backdoorlab.data.dataset import DataError
from backdoorlab.files import atomic_path
from backdoorlab.progress import progress_bar

#: Schema metadata key of the JSON a backdoorlab export stores (its run's config...).
METADATA_KEY = b"backdoorlab"
#: Split names by file name; the first of ``test``'s present is the test split.
SPLITS = {"train": ("train",), "test": ("test", "validation", "valid", "val")}
#: Integer columns taken as labels where no ``ClassLabel`` says which, in this order of preference.
LABEL_NAMES = ("label", "labels", "fine_label", "target", "class", "y")
IMAGE_NAMES = ("image", "img")
_SPLIT_FILE = re.compile(r"^([a-z]+)(?:[-._ 0-9].*)?$")
_GREY_MODES = ("L", "1", "I", "I;16", "LA")

#: One split: uint8 images ``(N, C, H, W)`` and int64 labels.
Arrays = tuple[Tensor, Tensor]


def resolve_path(text: str, root: Path | None, prefix: str) -> Path:
    """``PATH`` of ``prefix:PATH``: as given (``~`` expanded) where it exists, else under the data
    root; an error names both places looked at."""
    if not text:
        raise DataError(f"dataset '{prefix}:' names no path: write {prefix}:PATH")
    path = Path(text).expanduser()
    if path.exists():
        return path
    tried = [str(path)]
    if root is not None and not path.is_absolute():
        if (root / path).exists():
            return root / path
        tried.append(str(root / path))
    raise DataError(f"dataset '{prefix}:{text}': no such file or folder ({' nor '.join(tried)})")


# --------------------------------------------------------------------------------------------
# decoding


class _Stacker:
    """Decoded images of one dataset, checked to share the size of the first one seen."""

    def __init__(self) -> None:
        self.first: tuple[str, tuple[int, int]] | None = None

    def decode(self, blob: bytes | None, where: str) -> np.ndarray:
        """One encoded image as ``(H, W)`` (grey) or ``(H, W, 3)`` uint8; ``where`` names it in errors."""
        if blob is None:
            raise DataError(f"{where}: no image bytes")
        try:
            img = Image.open(io.BytesIO(blob))
            img.load()
        except Exception as err:  # PIL raises many types for corrupt data
            raise DataError(f"{where}: cannot decode image ({err})") from err
        if self.first is None:
            self.first = (where, img.size)
        elif img.size != self.first[1]:
            (w, h), (fw, fh) = img.size, self.first[1]
            raise DataError(
                f"{where} is {w}x{h} pixels but {self.first[0]} is {fw}x{fh}: a dataset's images must "
                "share one size (resize them first)"
            )
        return np.asarray(img.convert("L" if img.mode in _GREY_MODES else "RGB"))

    def stack(self, blobs: Iterable[bytes | None], names: Sequence[str], description: str) -> list[np.ndarray]:
        """Decode ``blobs`` (``names[i]`` names the i-th in errors) with a progress bar."""
        blobs = progress_bar(blobs, description, total=len(names))
        return [self.decode(blob, where) for blob, where in zip(blobs, names, strict=True)]


def to_tensor(arrays: list[np.ndarray], colour: bool) -> Tensor:
    """Decoded images as uint8 ``(N, C, H, W)``: 3 channels where ``colour`` (grey ones repeated)."""
    if colour:
        arrays = [a if a.ndim == 3 else np.repeat(a[:, :, None], 3, axis=2) for a in arrays]
    images = torch.from_numpy(np.stack(arrays))
    return (images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)).contiguous()


# --------------------------------------------------------------------------------------------
# parquet


@dataclass(frozen=True)
class ParquetSplit:
    """One parquet split file, decoded: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64,
    ``classes`` (from ``ClassLabel``, else ``None``), the other numeric or boolean ``columns`` as
    tensors (an export's ``poisoned`` mask...), and the ``backdoorlab`` schema metadata (``{}``)."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...] | None
    columns: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def _features(schema: pa.Schema, path: Path) -> dict[str, Any]:
    """The ``huggingface`` metadata's features (``{}`` where absent)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta is None:
        return {}
    try:
        features = json.loads(meta)["info"]["features"]
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: unreadable 'huggingface' schema metadata ({err})") from err
    return features if isinstance(features, dict) else {}


def _pick(candidates: list[str], preferred: Sequence[str], path: Path, what: str) -> str | None:
    """The candidate named first in ``preferred``, else the only one; several others are an error."""
    for name in preferred:
        if name in candidates:
            return name
    if len(candidates) > 1:
        raise DataError(f"{path}: several {what} columns ({', '.join(candidates)}); name one of them {preferred[0]}")
    return candidates[0] if candidates else None


def _columns_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema) or "none"


def image_column(schema: pa.Schema, features: Mapping[str, Any], path: Path) -> str:
    """The name of the column of encoded images (module docstring)."""
    typed = [
        f.name for f in schema if isinstance(features.get(f.name), dict) and features[f.name].get("_type") == "Image"
    ]
    encoded = [
        f.name
        for f in schema
        if pa.types.is_binary(f.type)
        or pa.types.is_large_binary(f.type)
        or (pa.types.is_struct(f.type) and f.type.get_field_index("bytes") >= 0)
    ]
    name = _pick(typed or encoded, IMAGE_NAMES, path, "image")
    if name is None:
        raise DataError(
            f"{path}: no image column: expected a Hugging Face Image column (struct {{bytes, path}}) or a binary "
            f"column of encoded images; columns: {_columns_text(schema)}"
        )
    return name


def label_column(schema: pa.Schema, features: Mapping[str, Any], path: Path) -> str:
    """The name of the column of class labels (module docstring)."""
    typed = [
        f.name
        for f in schema
        if isinstance(features.get(f.name), dict) and features[f.name].get("_type") == "ClassLabel"
    ]
    named = [n for n in LABEL_NAMES if n in schema.names and pa.types.is_integer(schema.field(n).type)]
    name = _pick(typed, LABEL_NAMES, path, "ClassLabel") or (named[0] if named else None)
    if name is None:
        raise DataError(
            f"{path}: no label column: expected a ClassLabel column or an integer column named "
            f"{', '.join(LABEL_NAMES)}; columns: {_columns_text(schema)}"
        )
    if not pa.types.is_integer(schema.field(name).type):
        raise DataError(f"{path}: label column '{name}' holds {schema.field(name).type}, not integers")
    return name


def read_parquet_split(path: str | Path) -> ParquetSplit:
    """Decode one parquet split file (not cached: :func:`read_parquet_cached` is). Every error
    names the file, and the row for an image that will not decode."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from err
    return table_split(table, path, f"decoding {path.parent.name}/{path.name}")


def table_split(table: pa.Table, path: Path, description: str) -> ParquetSplit:
    """Decode an Arrow table in the Hugging Face layout (a parquet file's, or a ``datasets``
    split's); ``path`` names it in errors, ``description`` on the progress bar."""
    features = _features(table.schema, path)
    image, label = image_column(table.schema, features, path), label_column(table.schema, features, path)
    if table.num_rows == 0:
        raise DataError(f"{path}: the file holds no rows")
    column = table.column(image).combine_chunks()
    blobs = column.field("bytes").to_pylist() if pa.types.is_struct(column.type) else column.to_pylist()
    labels = table.column(label)
    if labels.null_count:
        raise DataError(f"{path}: column '{label}' has {labels.null_count} empty label(s)")
    names = [f"{path}: row {i}" for i in range(len(blobs))]
    arrays = _Stacker().stack(blobs, names, description)
    classes = features.get(label, {}).get("names") if isinstance(features.get(label), dict) else None
    columns = {}
    for f in table.schema:
        numeric = pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type)
        if f.name not in (image, label) and numeric and table.column(f.name).null_count == 0:
            columns[f.name] = torch.from_numpy(table.column(f.name).to_numpy().copy())
    try:
        metadata = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    except ValueError as err:
        raise DataError(f"{path}: unreadable '{METADATA_KEY.decode()}' schema metadata ({err})") from err
    return ParquetSplit(
        to_tensor(arrays, any(a.ndim == 3 for a in arrays)),
        torch.from_numpy(labels.to_numpy().astype(np.int64)),
        tuple(str(n) for n in classes) if classes is not None else None,
        columns,
        metadata,
    )


def read_parquet_cached(path: Path) -> ParquetSplit:
    """:func:`read_parquet_split`, decoded once per file (the cache is keyed on its path, size and time)."""

    def build() -> dict[str, object]:
        split = read_parquet_split(path)
        return {
            "images": split.images,
            "labels": split.labels,
            "classes": list(split.classes) if split.classes is not None else None,
            "columns": split.columns,
            "metadata": json.dumps(split.metadata),
        }

    entry = cached(path, f"parquet-{path.stem}", build)
    classes = entry["classes"]
    return ParquetSplit(
        entry["images"],  # type: ignore[arg-type]
        entry["labels"],  # type: ignore[arg-type]
        tuple(classes) if classes is not None else None,  # type: ignore[arg-type]
        dict(entry["columns"]),  # type: ignore[call-overload]
        json.loads(entry["metadata"]),  # type: ignore[arg-type]
    )


def parquet_split_files(path: Path) -> dict[str, list[Path]]:
    """The training and test files of ``parquet:PATH`` (module docstring), shards sorted."""
    if path.is_file():
        if "train" not in path.name:
            raise DataError(
                f"{path}: give a folder, or the training file (a name with 'train'), its test file beside it with 'test'"
            )
        test = path.with_name(path.name.replace("train", "test"))
        if not test.is_file():
            raise DataError(f"{test}: missing: the test file that goes with {path.name}")
        return {"train": [path], "test": [test]}
    found: dict[str, list[Path]] = {}
    for file in sorted({*path.glob("*.parquet"), *path.glob("data/*.parquet")}):
        match = _SPLIT_FILE.match(file.stem.lower())
        if match:
            found.setdefault(match.group(1), []).append(file)
    for name in (n for names in SPLITS.values() for n in names):
        found.setdefault(name, []).extend(sorted((path / name).glob("*.parquet")))
    chosen = {}
    for split, names in SPLITS.items():
        name = next((n for n in names if found.get(n)), None)
        if name is None:
            listed = ", ".join(str(f.relative_to(path)) for f in sorted(path.rglob("*.parquet"))) or "no parquet file"
            raise DataError(
                f"{path}: no {split} split: expected {split}.parquet (or {split}-*.parquet, data/{split}-*.parquet, "
                f"{split}/*.parquet); found {listed}"
            )
        chosen[split] = found[name]
    return chosen


def _join(parts: list[ParquetSplit]) -> ParquetSplit:
    """A split's shards as one (columns all shards have; the first shard's classes and metadata)."""
    if len(parts) == 1:
        return parts[0]
    shared = set.intersection(*(set(p.columns) for p in parts))
    return ParquetSplit(
        torch.cat([p.images for p in parts]),
        torch.cat([p.labels for p in parts]),
        next((p.classes for p in parts if p.classes is not None), None),
        {name: torch.cat([p.columns[name] for p in parts]) for name in sorted(shared)},
        parts[0].metadata,
    )


def read_parquet_dataset(path: Path) -> tuple[Arrays, Arrays, tuple[str, ...]]:
    """``parquet:PATH`` as ``(train, test, class names)``: one image size and channel count across
    both splits, labels checked against the class names."""
    files = parquet_split_files(path)
    splits = {name: _join([read_parquet_cached(f) for f in found]) for name, found in files.items()}
    return checked_dataset(splits["train"], splits["test"], files["train"][0], files["test"][0])


def checked_dataset(
    train: ParquetSplit, test: ParquetSplit, train_where: Path, test_where: Path
) -> tuple[Arrays, Arrays, tuple[str, ...]]:
    """Two decoded splits as ``(train, test, class names)``: one image size across both (an error
    names ``test_where`` otherwise), grey made colour where the other split has colour, labels
    checked against the class names (``ClassLabel``'s, else ``"0".."K-1"``)."""
    if train.images.shape[2:] != test.images.shape[2:]:
        raise DataError(
            f"{test_where}: images are {tuple(test.images.shape[2:])} but {train_where}'s are "
            f"{tuple(train.images.shape[2:])}: a dataset's images must share one size"
        )
    if train.images.shape[1] != test.images.shape[1]:  # grey in one split, colour in the other
        train, test = (s if s.images.shape[1] == 3 else _colour(s) for s in (train, test))
    classes = train.classes or test.classes
    if classes is None:
        classes = tuple(str(i) for i in range(int(max(train.labels.max(), test.labels.max())) + 1))
    for where, split in ((train_where, train), (test_where, test)):
        labels = split.labels
        if int(labels.min()) < 0 or int(labels.max()) >= len(classes):
            raise DataError(f"{where}: labels {int(labels.min())}..{int(labels.max())} outside 0..{len(classes) - 1}")
    return (train.images, train.labels), (test.images, test.labels), classes


def read_hf_dataset(name: str) -> tuple[Arrays, Arrays, tuple[str, ...]]:
    """``hf:NAME``: ``datasets.load_dataset(NAME)`` (a hub name such as ``uoft-cs/cifar10``, which
    downloads into the library's own cache, or a local folder of data files), its ``train`` split and
    the first of ``test``, ``validation``... as the test split, decoded as ``parquet:`` files are
    (the image and label columns found the same way). The decoded tensors are not cached here: the
    library caches the files, and decoding runs again per load."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf:{name}: needs the Hugging Face datasets package: pip install datasets") from None
    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # the library's own errors: not found, offline, gated...
        raise DataError(f"hf:{name}: the datasets library could not load it: {' '.join(str(err).split())}") from err
    chosen: dict[str, str] = {}
    for split, names in SPLITS.items():
        found = next((n for n in names if n in loaded), None)
        if found is None:
            raise DataError(
                f"hf:{name}: no {split} split (expected one of {', '.join(names)}; it has {', '.join(loaded)})"
            )
        chosen[split] = found
    parts = {
        split: table_split(loaded[found].data.table, Path(f"hf:{name}[{found}]"), f"decoding {name} {found}")
        for split, found in chosen.items()
    }
    return checked_dataset(
        parts["train"], parts["test"], Path(f"hf:{name}[train]"), Path(f"hf:{name}[{chosen['test']}]")
    )


def _colour(split: ParquetSplit) -> ParquetSplit:
    """A grey split as three channels."""
    return dataclasses.replace(split, images=split.images.expand(-1, 3, -1, -1).contiguous())


# --------------------------------------------------------------------------------------------
# image folders


def image_extensions() -> frozenset[str]:
    """File extensions Pillow opens (``.png``, ``.jpg``...), lower case."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def _class_files(folder: Path, extensions: frozenset[str]) -> list[Path]:
    files = sorted(
        f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in extensions
    )
    if not files:
        raise DataError(f"{folder}: a class folder with no image file (.png, .jpg ...)")
    return files


def read_image_folder(path: Path) -> tuple[Arrays, Arrays, tuple[str, ...]]:
    """``folder:PATH`` as ``(train, test, class names)``: ``PATH/{train,test}/<class>/<image>``,
    classes sorted by name, images decoded with Pillow; one size across both splits."""
    folders = {split: path / split for split in SPLITS}
    for split, folder in folders.items():
        if not folder.is_dir():
            raise DataError(f"{folder}: missing: expected {path}/train/<class>/<image> and {path}/test/<class>/<image>")
    classes = tuple(sorted(d.name for d in folders["train"].iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not classes:
        raise DataError(f"{folders['train']}: no class folder: expected {folders['train']}/<class>/<image>")
    extra = sorted(
        d.name for d in folders["test"].iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in classes
    )
    if extra:
        raise DataError(f"{folders['test']}: class folder(s) {', '.join(extra)} that the training split does not have")
    extensions, stacker = image_extensions(), _Stacker()
    decoded: dict[str, tuple[list[np.ndarray], Tensor]] = {}
    for split, folder in folders.items():
        files, labels = [], []
        for index, name in enumerate(classes):
            if split == "train" or (folder / name).is_dir():
                found = _class_files(folder / name, extensions)
                files += found
                labels += [index] * len(found)
        if not files:
            raise DataError(f"{folder}: no image in any class folder")
        arrays = stacker.stack((f.read_bytes() for f in files), [str(f) for f in files], f"decoding {folder}")
        decoded[split] = (arrays, torch.tensor(labels, dtype=torch.int64))
    colour = any(a.ndim == 3 for arrays, _ in decoded.values() for a in arrays)
    train, test = ((to_tensor(arrays, colour), labels) for arrays, labels in decoded.values())
    return train, test, classes


# --------------------------------------------------------------------------------------------
# writing


def _encode_png(image: Tensor) -> bytes:
    array = image.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def _hf_dtype(kind: pa.DataType) -> str:
    return "bool" if pa.types.is_boolean(kind) else str(kind).replace("double", "float64").replace("float", "float32")


def write_image_parquet(
    path: str | Path,
    images: Tensor,
    labels: Tensor,
    classes: Sequence[str],
    columns: Mapping[str, Tensor] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write uint8 images ``(N, C, H, W)`` (1 or 3 channels, as PNG) and labels to ``path`` in the
    Hugging Face layout (``image`` struct ``{bytes, path}``, ``label`` ``ClassLabel`` with
    ``classes``), with ``columns`` (one value a row: a mask, other labels) and ``metadata`` (JSON,
    under the schema key ``backdoorlab``). ``parquet:`` and ``datasets.load_dataset("parquet")``
    read it back. The file is written atomically."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"{path}: images must be uint8 (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (len(images),):
        raise DataError(f"{path}: {len(images)} images but labels of shape {tuple(labels.shape)}")
    blobs = [_encode_png(image) for image in progress_bar(images.cpu(), f"encoding {Path(path).name}")]
    arrays = {
        "image": pa.StructArray.from_arrays(
            [pa.array(blobs, pa.binary()), pa.array([None] * len(blobs), pa.string())], ["bytes", "path"]
        ),
        "label": pa.array(labels.cpu().numpy().astype(np.int64)),
    }
    features: dict[str, Any] = {
        "image": {"_type": "Image"},
        "label": {"names": [str(c) for c in classes], "_type": "ClassLabel"},
    }
    for name, values in (columns or {}).items():
        if name in arrays or values.shape != (len(images),):
            raise DataError(f"{path}: column '{name}' must be a new name with one value per image")
        arrays[name] = pa.array(values.cpu().numpy())
        features[name] = {"dtype": _hf_dtype(arrays[name].type), "_type": "Value"}
    schema_meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    if metadata is not None:
        schema_meta[METADATA_KEY] = json.dumps(metadata).encode()
    table = pa.table(arrays).replace_schema_metadata(schema_meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=1000, compression="zstd")
    return Path(path)
