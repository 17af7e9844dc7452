from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from backdoorlab.data import (
    DataError,
    DataNotFoundError,
    TensorDataset,
    load_dataset,
    resolve_count,
    split_trusted,
    subsample,
)
from backdoorlab.data import parquet as parquet_module
from backdoorlab.data.parquet import read_image_parquet
from backdoorlab.registry import UnknownNameError


def test_digits_tensors_and_fixed_split(digits):
    train, test = digits.train, digits.test
    assert train.inputs.dtype == torch.uint8 and train.inputs.shape == (1437, 1, 8, 8)
    assert test.inputs.shape == (360, 1, 8, 8) and test.labels.dtype == torch.int64
    assert train.inputs.max() == 255 and train.num_classes == 10 and not train.hflip
    # stratified: every class is in the test split with 36 or 37 samples
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    again = load_dataset("digits")
    assert torch.equal(again.test.inputs, test.inputs)
    assert 0.2 < train.mean[0] < 0.4 and 0.3 < train.std[0] < 0.45


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(
        UnknownNameError,
        match="valid datasets: acsf1, arrowhead, basicmotions, cifar10, digits, gtsrb, .*ucr:<Name>, sktime:<Name>",
    ):
        load_dataset("cifar100")


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0.1, 100),
        (1.0, 1000),
        (1, 1),
        (250, 250),
        (0.0004, None),
        (0.0, None),
        (1.5, None),
        (-3, None),
        (1001, None),
        ("0.1", None),
        (True, None),
    ],
)
def test_resolve_count(size, expected):
    if expected is None:
        with pytest.raises(DataError):
            resolve_count(size, 1000, "test size")
    else:
        assert resolve_count(size, 1000, "test size") == expected


def indexed_dataset(n: int) -> TensorDataset:
    """Sample i's two pixels spell i in base 256, so a subset tells which samples it holds."""
    ids = torch.arange(n)
    inputs = torch.stack([ids // 256, ids % 256], dim=1).to(torch.uint8).view(n, 1, 1, 2)
    return TensorDataset(inputs, ids % 10, tuple("0123456789"), (0.5,), (0.5,), "indexed")


def ids_of(data: TensorDataset) -> set[int]:
    return set((data.inputs[:, 0, 0, 0].long() * 256 + data.inputs[:, 0, 0, 1].long()).tolist())


def test_trusted_split_is_disjoint_seeded_and_refuses_empty():
    data = indexed_dataset(1000)
    rest, trusted = split_trusted(data, 0.05, seed=3)
    assert len(trusted) == 50 and len(rest) == 950
    assert ids_of(rest) | ids_of(trusted) == set(range(1000)) and not ids_of(rest) & ids_of(trusted)
    assert ids_of(split_trusted(data, 0.05, seed=3)[1]) == ids_of(trusted)
    assert ids_of(split_trusted(data, 0.05, seed=4)[1]) != ids_of(trusted)
    assert len(split_trusted(data, 20, seed=0)[1]) == 20
    assert len(split_trusted(data, 0.0001, seed=0)[1]) == 1  # a tiny set's 1% is one sample
    with pytest.raises(DataError, match="fraction in"):
        split_trusted(data, 0.0, seed=0)
    with pytest.raises(DataError, match="leave no training data"):
        split_trusted(data, 1.0, seed=0)


def test_subsample_is_seeded(digits):
    a = subsample(digits.train, 100, seed=1)
    assert len(a) == 100 and torch.equal(a.labels, subsample(digits.train, 100, seed=1).labels)


def _write_parquet(path: Path, images: list[bytes | None], labels: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)], image_type),
            "label": pa.array(labels, pa.int64()),
        }
    )
    pq.write_table(table, path)


def _png(value: int, size: int = 4) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_parquet_reader_decodes_grey_images(tmp_path):
    path = tmp_path / "mnist" / "train.parquet"
    _write_parquet(path, [_png(0), _png(128), _png(255)], [0, 1, 2])
    images, labels, classes = read_image_parquet(path)
    assert images.shape == (3, 1, 4, 4) and images.dtype == torch.uint8
    assert images[:, 0, 0, 0].tolist() == [0, 128, 255] and labels.tolist() == [0, 1, 2]
    assert classes == ("0", "1", "2")


def test_corrupted_parquet_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_CACHE", str(tmp_path / "cache"))
    for split in ("train", "test"):
        (tmp_path / "mnist").mkdir(exist_ok=True)
        (tmp_path / "mnist" / f"{split}.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"mnist/train\.parquet: not a readable parquet file"):
        load_dataset("mnist", tmp_path)


def test_undecodable_image_names_file_and_row(tmp_path):
    path = tmp_path / "broken.parquet"
    _write_parquet(path, [_png(1), b"\x89PNG garbage"], [0, 1])
    with pytest.raises(DataError, match=r"broken\.parquet: row 1: cannot decode image"):
        read_image_parquet(path)


def test_missing_column_names_the_file(tmp_path):
    path = tmp_path / "nolabel.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), path)
    with pytest.raises(DataError, match=r"nolabel\.parquet"):
        read_image_parquet(path)


def test_missing_files_without_download_say_where(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"expected .*cifar10/train\.parquet.*BACKDOORLAB_DATA"):
        load_dataset("cifar10", tmp_path, download=False)


def test_decoded_tensors_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_CACHE", str(tmp_path / "cache"))
    for split in ("train", "test"):
        _write_parquet(tmp_path / "mnist" / f"{split}.parquet", [_png(v) for v in (0, 9, 200)], [0, 1, 1])
    first = load_dataset("mnist", tmp_path)
    monkeypatch.setattr(parquet_module, "decode_image", lambda *a: pytest.fail("decoded again"))
    second = load_dataset("mnist", tmp_path)
    assert torch.equal(first.train.inputs, second.train.inputs)
    assert len(list((tmp_path / "cache").glob("mnist-*.pt"))) == 2


@pytest.mark.parametrize(
    ("name", "shape", "rows", "classes"),
    [("cifar10", (3, 32, 32), 10_000, 10), ("gtsrb", (3, 32, 32), 12_630, 43), ("mnist", (1, 28, 28), 10_000, 10)],
)
def test_shared_parquet_test_splits(data_root, name, shape, rows, classes):
    images, labels, names = read_image_parquet(data_root / name / "test.parquet")
    assert images.shape == (rows, *shape) and images.dtype == torch.uint8
    assert len(names) == classes and int(labels.max()) == classes - 1
    if name == "cifar10":
        assert names[0] == "airplane" and torch.bincount(labels).tolist() == [1000] * 10


def test_shared_mnist_loads_with_stats(data_root):
    splits = load_dataset("mnist", data_root)
    assert len(splits.train) == 60_000 and len(splits.test) == 10_000
    assert splits.train.mean == pytest.approx((0.1237,), abs=1e-3)  # the data README's figure


def test_from_arrays_takes_numpy_images_in_any_layout_and_series_and_refuses_what_it_cannot_read():
    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    ds = TensorDataset.from_arrays(grey, [0, 1])
    assert ds.inputs.shape == (2, 1, 4, 4) and torch.equal(ds.inputs[1, 0], torch.from_numpy(grey[1]))
    assert ds.classes == ("0", "1") and ds.mean[0] == pytest.approx(grey.mean() / 255, rel=1e-5)
    rgb = np.random.default_rng(0).random((3, 5, 6, 3))
    ds = TensorDataset.from_arrays(rgb, np.array([2, 0, 1]), classes=["a", "b", "c"])
    assert ds.inputs.shape == (3, 3, 5, 6) and ds.inputs.dtype == torch.uint8
    assert int(ds.inputs[0, 2, 4, 5]) == round(rgb[0, 4, 5, 2] * 255)
    series = TensorDataset.from_arrays(np.ones((4, 10)), [0, 1, 0, 1])
    assert series.modality == "series" and series.input_shape == (1, 10)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert x.shape == (2, 3, 5, 6) and y.tolist() == [2, 0]
    with pytest.raises(DataError, match=r"float images must be in \[0, 1\]"):
        TensorDataset.from_arrays(rgb * 2, [0, 1, 2])
    with pytest.raises(DataError, match="labels must be 3 integers"):
        TensorDataset.from_arrays(rgb, [0.5, 1, 2])
    with pytest.raises(DataError, match="2 class names for labels up to 2"):
        TensorDataset.from_arrays(rgb, [0, 1, 2], classes=["a", "b"])
