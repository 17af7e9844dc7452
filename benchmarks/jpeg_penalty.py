"""The JPEG penalty: re-encode a parquet dataset as JPEG at a chosen quality and chroma subsampling.

Our CIFAR-10 (``$BACKDOORLAB_DATA/cifar10``) is its source's JPEG re-encoding at quality 75, 4:2:0, not
the official lossless pixels; our GTSRB is JPEG quality 95, 4:4:4. To estimate what the lossy
encoding costs a trained model, this script writes a copy of one dataset with every image (train and
test) decoded and encoded again with Pillow at ``--quality`` and ``--subsampling`` (Pillow's codes:
0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0), in the same layout, ``OUT/<name>/{train,test}.parquet``: the same
schema, schema metadata (the Hugging Face features), labels, row order, row groups of 1,000 and zstd;
only the ``image`` struct's ``bytes`` change (``path`` keeps the source's provenance). The other
folders of the source root are symlinked into ``OUT``, so ``BACKDOORLAB_DATA=OUT`` serves every dataset,
with ``<name>`` re-encoded.

The decoded-tensor cache (:mod:`backdoorlab.data.cache`) is keyed by a file's resolved path, size and
modification time, and nothing checks the files against ``SHA256SUMS`` at load time, so the copy's
files, at their own path, get their own cache entries (the symlinked datasets resolve to, and share,
the originals').

It also prints what the source's JPEG headers say: for each split, the count of images per (quality,
chroma subsampling), the quality found by matching the file's quantization tables
(``Image.quantization``) against the ones Pillow writes at each quality 1..100 (libjpeg's standard
tables scaled; "custom" where none matches), the sampling from ``JpegImagePlugin.get_sampling``; and
for the written copy, the PSNR against the source pixels (mean of the per-image PSNRs over the test
set, and the PSNR of the pooled mean squared error).

Usage::

    python benchmarks/jpeg_penalty.py --dataset gtsrb --output /tmp/jpeg-root [--quality 75 --subsampling 2]
    python benchmarks/jpeg_penalty.py --inspect gtsrb,cifar10     # headers only, writes nothing
    BACKDOORLAB_DATA=/tmp/jpeg-root backdoorlab run --dataset gtsrb --poison-rate 0 --device cpu
"""

from __future__ import annotations

import argparse
import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, JpegImagePlugin

from backdoorlab.data.parquet import decode_image
from backdoorlab.data.sources import resolve_data_root
from backdoorlab.files import atomic_path

SPLITS = ("train", "test")
SAMPLING = {-1: "n/a", 0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
PROJECT = Path(__file__).resolve().parents[1]


def _tables(img: Image.Image) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(img.quantization[k]) for k in sorted(img.quantization))


def pillow_tables(mode: str) -> dict[tuple[tuple[int, ...], ...], int]:
    """Quantization tables -> the quality at which Pillow (libjpeg's standard tables) writes them.
    Where several qualities give the same tables (never, above quality 1), the highest wins."""
    blank = Image.new(mode, (8, 8))
    found = {}
    for quality in range(1, 101):
        buffer = io.BytesIO()
        blank.save(buffer, "JPEG", quality=quality)
        found[_tables(Image.open(buffer))] = quality
    return found


def header(blob: bytes, known: dict[str, dict]) -> tuple[str, str]:
    """(quality, chroma sampling) of one encoded image, from its header; format name if not a JPEG."""
    img = Image.open(io.BytesIO(blob))
    if img.format != "JPEG":
        return img.format or "?", "n/a"
    if img.mode not in known:
        known[img.mode] = pillow_tables(img.mode)
    quality = known[img.mode].get(_tables(img))
    return (str(quality) if quality is not None else "custom"), SAMPLING.get(JpegImagePlugin.get_sampling(img), "?")


def blobs(table: pa.Table) -> list[bytes]:
    return table.column("image").combine_chunks().field("bytes").to_pylist()


def inspect(root: Path, name: str) -> None:
    known: dict[str, dict] = {}
    for split in SPLITS:
        path = root / name / f"{split}.parquet"
        counts = Counter(header(b, known) for b in blobs(pq.read_table(path, columns=["image"])))
        text = ", ".join(f"quality {q} {s}: {n}" for (q, s), n in counts.most_common())
        print(f"{name}/{split}: {sum(counts.values())} images; {text}", flush=True)


def reencode(
    blob: bytes, where: Path, row: int, quality: int, subsampling: int
) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The image re-encoded, and its pixels before and after (uint8, as the readers decode them)."""
    img = decode_image(blob, where, row)
    img = img.convert("L" if img.mode in ("L", "1") else "RGB")
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality, subsampling=subsampling)
    data = buffer.getvalue()
    return data, np.asarray(img), np.asarray(decode_image(data, where, row).convert(img.mode))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def write_copy(source: Path, output: Path, name: str, quality: int, subsampling: int) -> None:
    for split in SPLITS:
        path = source / name / f"{split}.parquet"
        table = pq.read_table(path)
        column = table.column("image").combine_chunks()
        old = column.field("bytes").to_pylist()
        new, per_image, errors = [], [], []
        for row, blob in enumerate(old):
            data, before, after = reencode(blob, path, row, quality, subsampling)
            new.append(data)
            per_image.append(psnr(before, after))
            errors.append(np.abs(before.astype(np.int16) - after.astype(np.int16)))
        image = pa.StructArray.from_arrays(
            [pa.array(new, column.type.field("bytes").type), column.field("path")],
            fields=[column.type.field("bytes"), column.type.field("path")],
        )
        out = table.set_column(table.schema.get_field_index("image"), table.schema.field("image"), image)
        out = out.replace_schema_metadata(table.schema.metadata)
        target = output / name / f"{split}.parquet"
        with atomic_path(target) as tmp:
            pq.write_table(out, tmp, row_group_size=1000, compression="zstd")
        err = np.stack(errors).astype(np.float64)
        pooled = 10 * np.log10(255.0**2 / float(np.mean(err**2)))
        finite = [p for p in per_image if np.isfinite(p)]
        print(
            f"{name}/{split}: wrote {target} ({len(new)} images, {target.stat().st_size / 1e6:.1f} MB, source "
            f"{path.stat().st_size / 1e6:.1f} MB); PSNR against the source pixels: mean per image "
            f"{np.mean(finite):.2f} dB ({len(per_image) - len(finite)} identical), pooled {pooled:.2f} dB; "
            f"mean absolute error {err.mean():.2f}, largest {int(err.max())} (of 255)",
            flush=True,
        )


def link_rest(source: Path, output: Path, name: str) -> None:
    """Symlink the source root's other folders into ``output`` (skipping any already there; not its
    README and SHA256SUMS, which describe the source's ``name``)."""
    for entry in sorted(source.iterdir()):
        link = output / entry.name
        if entry.is_dir() and entry.name != name and not link.exists() and not link.is_symlink():
            link.symlink_to(entry.resolve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", help="source data root (default $BACKDOORLAB_DATA)")
    parser.add_argument("--dataset", default="gtsrb", help="the dataset folder to re-encode")
    parser.add_argument("--output", help="the new data root (outside the project and the source root)")
    parser.add_argument("--quality", type=int, default=75)
    parser.add_argument("--subsampling", type=int, default=2, choices=(0, 1, 2), help="0 4:4:4, 1 4:2:2, 2 4:2:0")
    parser.add_argument("--inspect", help="comma-separated datasets whose JPEG headers to print")
    args = parser.parse_args()
    source = resolve_data_root(args.data_root)
    if source is None:
        parser.error("no source: pass --data-root or set BACKDOORLAB_DATA")
    source = source.resolve()
    for name in (args.inspect or args.dataset).split(","):
        inspect(source, name)
    if args.inspect:
        return
    if not args.output:
        parser.error("--output is required (or --inspect for headers only)")
    output = Path(args.output).expanduser().resolve()
    for forbidden in (PROJECT, source):
        if output == forbidden or forbidden in output.parents:
            parser.error(f"--output {output} is inside {forbidden}: write the copy elsewhere")
    os.makedirs(output, exist_ok=True)
    write_copy(source, output, args.dataset, args.quality, args.subsampling)
    link_rest(source, output, args.dataset)
    inspect(output, args.dataset)


if __name__ == "__main__":
    main()
