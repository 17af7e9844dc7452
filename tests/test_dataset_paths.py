"""Datasets by path (``parquet:PATH``, ``folder:PATH``) wherever a dataset name goes, the fallback
recipe's warning, and the export of poisoned data with its round trip through ``parquet:``."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from backdoorlab.cli import app
from backdoorlab.data import DataError, load_dataset
from backdoorlab.data.parquet import read_image_parquet
from backdoorlab.data.paths import read_parquet_split
from backdoorlab.data.sources import channel_stats, dataset_modality
from backdoorlab.experiments import RunConfig, export_poisoned, load_export
from backdoorlab.experiments.grid import load_grid
from backdoorlab.experiments.run import prepare
from backdoorlab.experiments.store import ResultStore
from backdoorlab.experiments.sweep import sweep

runner = CliRunner()
#: A run small enough for a few seconds on tiny data: the model and schedule set, so only they differ.
TINY_RUN = {"model": "small_cnn", "epochs": 1, "batch_size": 8, "device": "cpu"}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BACKDOORLAB_CACHE", str(tmp_path / "cache"))


def png(value: int, size: tuple[int, int] = (8, 8), mode: str = "L", noise: int = 0) -> bytes:
    """A PNG of one grey level (``mode`` RGB: the same in every channel), plus seeded noise."""
    pixels = np.full((size[1], size[0]), value, dtype=np.int16)
    pixels += np.random.default_rng(noise).integers(-20, 21, pixels.shape) if noise else 0
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_hf(path: Path, blobs: list[bytes], labels: list[int], names: list[str] | None = None, **columns) -> Path:
    """A parquet file as Hugging Face writes it: ``image`` struct {bytes, path}, ``label``, features metadata
    (``names``: a ClassLabel; ``None``: no metadata). ``columns`` name other columns, or replace these."""
    image = pa.StructArray.from_arrays(
        [pa.array(blobs, pa.binary()), pa.array([None] * len(blobs), pa.string())], ["bytes", "path"]
    )
    table = pa.table({"image": image, "label": pa.array(labels, pa.int64()), **columns})
    if names is not None:
        features = {"image": {"_type": "Image"}, "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def tiny_parquet(folder: Path, per_class: tuple[int, int] = (8, 3)) -> Path:
    """Three classes of grey 8x8 images, their level set by the class: train and test files."""
    for split, count in zip(("train", "test"), per_class, strict=True):
        labels = [c for c in range(3) for _ in range(count)]
        blobs = [png(40 + 80 * c + (20 if split == "test" else 0), noise=i + 1) for i, c in enumerate(labels)]
        write_hf(folder / f"{split}.parquet", blobs, labels, ["cat", "dog", "eel"])
    return folder


def tiny_folder(root: Path, per_class: tuple[int, int] = (12, 4), classes: tuple[str, ...] = ("b", "a", "c")) -> Path:
    """An image folder ``root/{train,test}/<class>/<n>.png`` of grey 8x8 images, level by sorted class."""
    for split, count in zip(("train", "test"), per_class, strict=True):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                level = 40 + 80 * sorted(classes).index(name)
                (root / split / name / f"{i}.png").write_bytes(png(level, noise=i + 1))
    return root


# --- parquet:PATH ------------------------------------------------------------------------------


def test_parquet_path_reads_images_labels_and_class_names_with_the_training_split_stats(tmp_path: Path) -> None:
    folder = tiny_parquet(tmp_path / "mine")
    splits = load_dataset(f"parquet:{folder}")
    train, test = splits.train, splits.test
    assert train.inputs.shape == (24, 1, 8, 8) and test.inputs.shape == (9, 1, 8, 8)
    assert train.classes == ("cat", "dog", "eel") and test.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert train.name == f"parquet:{folder}" and dataset_modality(train.name) == "image"
    # the statistics are the training split's (the test split is brighter), for both splits
    assert train.mean == channel_stats(train.inputs)[0] != channel_stats(test.inputs)[0]
    assert test.mean == train.mean and test.std == train.std
    expected = np.array(Image.open(io.BytesIO(png(120, noise=9))))
    assert torch.equal(train.inputs[8, 0], torch.from_numpy(expected))  # row 8: the first dog


def test_parquet_path_takes_shards_a_data_folder_validation_and_plain_columns(tmp_path: Path) -> None:
    """The Hub's layout: data/train-0000N-of-00002 shards, a validation split, a binary ``img``
    column and an integer ``fine_label`` without metadata (class names 0..K-1)."""
    data = tmp_path / "hub" / "data"
    data.mkdir(parents=True)
    for name, levels, labels in (
        ("train-00000-of-00002", [10, 20], [0, 1]),
        ("train-00001-of-00002", [30], [3]),
        ("validation-00000-of-00001", [40, 50], [2, 0]),
    ):
        table = pa.table(
            {"img": pa.array([png(v) for v in levels], pa.binary()), "fine_label": labels, "note": ["x"] * len(levels)}
        )
        pq.write_table(table, data / f"{name}.parquet")
    splits = load_dataset(f"parquet:{tmp_path / 'hub'}")
    assert splits.train.inputs[:, 0, 0, 0].tolist() == [10, 20, 30] and splits.train.labels.tolist() == [0, 1, 3]
    assert splits.test.labels.tolist() == [2, 0] and splits.train.classes == ("0", "1", "2", "3")


def test_parquet_path_to_a_training_file_takes_its_test_file_and_a_relative_path_the_data_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_hf(root / "pair" / "my_train.parquet", [png(1, mode="RGB"), png(2)], [0, 1])
    write_hf(root / "pair" / "my_test.parquet", [png(3)], [1])
    splits = load_dataset("parquet:pair/my_train.parquet", root)  # not in the current folder: under the root
    assert splits.train.inputs.shape == (2, 3, 8, 8) and splits.test.inputs.shape == (1, 3, 8, 8)  # one colour
    assert splits.test.inputs[0, :, 0, 0].tolist() == [3, 3, 3]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no test", r"hub: no test split: expected test\.parquet .*found train\.parquet"),
        ("no path", r"dataset 'parquet:.*nowhere': no such file or folder"),
        ("not parquet", r"train\.parquet: not a readable parquet file"),
        ("no image", r"train\.parquet: no image column: .*columns: pixels \(int64\), label \(int64\)"),
        ("no label", r"train\.parquet: no label column: expected a ClassLabel column or an integer column named label"),
        ("other size", r"train\.parquet: row 1 is 9x8 pixels but .*train\.parquet: row 0 is 8x8"),
        ("bad image", r"train\.parquet: row 1: cannot decode image"),
        ("label range", r"test\.parquet: labels 0\.\.5 outside 0\.\.2"),
    ],
)
def test_parquet_path_errors_name_the_file_and_what_is_wrong(tmp_path: Path, case: str, message: str) -> None:
    hub = tmp_path / "hub"
    train, test = hub / "train.parquet", hub / "test.parquet"
    write_hf(train, [png(1), png(2)], [0, 1], ["a", "b", "c"])
    write_hf(test, [png(3), png(4)], [0, 2], ["a", "b", "c"])
    if case == "no test":
        test.unlink()
    elif case == "not parquet":
        train.write_bytes(b"not parquet at all")
    elif case == "no image":
        pq.write_table(pa.table({"pixels": [1, 2], "label": [0, 1]}), train)
    elif case == "no label":
        write_hf(train, [png(1), png(2)], [0, 1], label=pa.array(["a", "b"]))
    elif case == "other size":
        write_hf(train, [png(1), png(2, size=(9, 8))], [0, 1], ["a", "b", "c"])
    elif case == "bad image":
        write_hf(train, [png(1), b"\x89PNG broken"], [0, 1], ["a", "b", "c"])
    elif case == "label range":
        write_hf(test, [png(3), png(4)], [0, 5], ["a", "b", "c"])
    name = f"parquet:{tmp_path / 'nowhere'}" if case == "no path" else f"parquet:{hub}"
    with pytest.raises(DataError, match=message):
        load_dataset(name)


def test_shared_parquet_files_read_as_the_registered_reader_reads_them(data_root: Path) -> None:
    path = data_root / "mnist" / "test.parquet"
    images, labels, classes = read_image_parquet(path)
    split = read_parquet_split(path)
    assert torch.equal(split.images, images) and torch.equal(split.labels, labels) and split.classes == classes


# --- folder:PATH -------------------------------------------------------------------------------


def test_folder_path_reads_sorted_classes_skips_other_files_and_takes_the_training_split_stats(tmp_path: Path) -> None:
    root = tiny_folder(tmp_path / "tree")
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "test" / "b").rename(tmp_path / "gone")  # a class absent from the test split
    (root / "test" / "c" / "0.png").write_bytes(png(200, mode="RGB"))  # one colour image: all get 3 channels
    splits = load_dataset(f"folder:{root}")
    assert splits.train.classes == ("a", "b", "c") and splits.train.inputs.shape == (36, 3, 8, 8)
    assert splits.train.labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    assert splits.test.labels.tolist() == [0] * 4 + [2] * 4
    assert splits.train.inputs[12:24].float().mean() == pytest.approx(120, abs=3)  # class b, level 120
    assert splits.test.mean == splits.train.mean == channel_stats(splits.train.inputs)[0]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other size", r"tree/test/c/2\.png is 9x8 pixels but .*tree/train/a/0\.png is 8x8: .*one size"),
        ("no test", r"tree/test: missing: expected .*/train/<class>/<image> and"),
        ("extra class", r"tree/test: class folder\(s\) z that the training split does not have"),
        ("empty class", r"tree/train/b: a class folder with no image file"),
        ("bad image", r"tree/train/a/3\.png: cannot decode image"),
    ],
)
def test_folder_path_errors_name_the_file_and_what_is_wrong(tmp_path: Path, case: str, message: str) -> None:
    root = tiny_folder(tmp_path / "tree", per_class=(4, 3))
    if case == "other size":
        (root / "test" / "c" / "2.png").write_bytes(png(9, size=(9, 8)))
    elif case == "no test":
        for file in (root / "test").rglob("*.png"):
            file.unlink()
        for folder in sorted((root / "test").iterdir()):
            folder.rmdir()
        (root / "test").rmdir()
    elif case == "extra class":
        (root / "test" / "z").mkdir()
    elif case == "empty class":
        for file in (root / "train" / "b").iterdir():
            file.unlink()
    elif case == "bad image":
        (root / "train" / "a" / "3.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=message):
        load_dataset(f"folder:{root}")


def test_unknown_prefixes_and_names_list_the_prefixed_forms(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match="prefixed names are ucr:<Name>, sktime:<Name>, parquet:<PATH>, folder:<PATH>, hf:<NAME>"
    ):
        load_dataset("parquets:x")
    with pytest.raises(DataError, match="unknown dataset 'folder:'; prefixed names are"):
        load_dataset("folder:")


# --- hf:NAME ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hf_name_reads_what_the_datasets_library_loads_as_parquet_reads_it(tmp_path, monkeypatch):
    """A local folder through ``datasets.load_dataset`` (offline, its cache in tmp_path) gives the
    same tensors and class names as ``parquet:`` on the same files; its errors name the set."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tiny_parquet(tmp_path / "mine")
    through_hf, direct = load_dataset(f"hf:{folder}"), load_dataset(f"parquet:{folder}")
    assert through_hf.train.name == f"hf:{folder}" and dataset_modality(f"hf:{folder}") == "image"
    assert through_hf.train.classes == direct.train.classes == ("cat", "dog", "eel")
    for a, b in ((through_hf.train, direct.train), (through_hf.test, direct.test)):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels) and a.mean == b.mean
    only_train = tmp_path / "only"
    write_hf(only_train / "train.parquet", [png(10)] * 2, [0, 1], ["a", "b"])
    with pytest.raises(DataError, match=f"hf:{only_train}: no test split .*it has train"):
        load_dataset(f"hf:{only_train}")
    with pytest.raises(DataError, match="hf:no/such-set-here: the datasets library could not load it"):
        load_dataset("hf:no/such-set-here")


# --- wherever a dataset name goes, and the fallback recipe ---------------------------------------


def test_a_set_by_path_gets_the_fallback_recipe_with_a_warning_and_a_registered_one_none() -> None:
    warning = RunConfig(dataset="folder:/data/x").recipe_fallback()
    assert warning is not None and warning.startswith(
        "model: recipe 'fast' has no settings for dataset 'folder:/data/x'"
    )
    assert "is cifar10's (airbench, 16 epochs, batch 1024, lr 1.5)" in warning
    assert RunConfig(dataset="parquet:x", recipe="quick").recipe_fallback() is not None
    assert RunConfig(dataset="parquet:x", recipe="backdoorbench").recipe_fallback() is None  # one protocol for all
    for dataset in ("cifar10", "mnist", "gtsrb", "digits"):
        assert RunConfig(dataset=dataset).recipe_fallback() is None, dataset
    chosen = RunConfig(dataset="parquet:x", **TINY_RUN)
    assert chosen.recipe_fallback() is not None, "the rest of the schedule is still cifar10's"
    assert chosen.resolved().recipe_fallback() is not None, "a resolved config (a sweep's cell) with the lent schedule"
    own = replace(chosen.resolved().train, label_smoothing=0.0, tta=0)
    assert RunConfig(dataset="parquet:x", model="small_cnn", train=own).recipe_fallback() is None, (
        "a schedule of one's own"
    )


def test_a_grid_of_a_folder_set_sweeps_and_its_results_carry_the_fallback_warning(tmp_path: Path) -> None:
    root = tiny_folder(tmp_path / "tree")
    fields = "".join(f"{key}: {value}\n" for key, value in TINY_RUN.items())
    grid = load_grid(_write(tmp_path / "grid.yaml", f"name: mine\ndataset: folder:{root}\n{fields}seed: [0, 1]\n"))
    summary = sweep(grid, tmp_path / "sweep", executor="inline")
    assert (summary.done, summary.failed) == (2, 0)
    with ResultStore(tmp_path / "sweep") as store:
        records = store.records(status="done")
    assert {r.result["config"]["dataset"] for r in records} == {f"folder:{root}"}
    assert all(any("has no settings for dataset" in w for w in r.result["warnings"]) for r in records)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- export ------------------------------------------------------------------------------------


def test_export_round_trip_keeps_images_labels_mask_and_config(tmp_path: Path) -> None:
    config = RunConfig(dataset="digits", attack="blended", poison_rate=0.1, train_size=300, test_size=100, device="cpu")
    written = export_poisoned(config, tmp_path / "out")
    assert sorted(p.name for p in written.values()) == [
        "test.parquet",
        "train.parquet",
        "triggered.parquet",
        "trusted.parquet",
    ]
    prepared = prepare(config)  # the same seeds: the same data
    poisoned = prepared.poisoned

    # as a dataset by path: train is the poisoned training set, test the clean test set
    splits = load_dataset(f"parquet:{tmp_path / 'out'}")
    assert torch.equal(splits.train.inputs, poisoned.data.inputs) and torch.equal(
        splits.train.labels, poisoned.data.labels
    )
    assert (
        torch.equal(splits.test.inputs, prepared.test_set.inputs) and splits.train.classes == prepared.train_set.classes
    )

    # with everything else: mask, original labels, triggered set, trusted split and config
    export = load_export(tmp_path / "out")
    assert export.poisoned.num_poisoned == poisoned.num_poisoned > 0
    assert torch.equal(export.poisoned.mask, poisoned.mask)
    assert torch.equal(export.poisoned.original_labels, poisoned.original_labels)
    assert torch.equal(export.triggered.inputs, prepared.triggered.inputs)
    assert torch.equal(export.triggered.target_labels, prepared.triggered.target_labels)
    assert torch.equal(export.trusted.inputs, prepared.trusted.inputs)
    assert export.config == {**prepared.config.to_dict(), "attack_options": prepared.trigger.config()}
    assert RunConfig.from_dict(export.config).resolved().poison_spec() == prepared.config.poison_spec()
    # the config sits in every file's parquet metadata, where any parquet reader finds it
    metadata = pq.read_schema(tmp_path / "out" / "triggered.parquet").metadata
    assert json.loads(metadata[b"backdoorlab"])["config"]["poison_rate"] == 0.1


def test_export_then_run_on_it_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["export", "--dataset", "digits", "--train-size", "200", "--test-size", "60", "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'train.parquet'}" in result.output.replace("\n", "")
    assert int(pq.read_table(out / "train.parquet", columns=["poisoned"]).column(0).to_numpy().sum()) == 20
    args = [
        "run",
        "--dataset",
        f"parquet:{out}",
        "--model",
        "small_cnn",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--output",
        str(tmp_path / "run"),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "result.json").read_text())["config"]["dataset"] == f"parquet:{out}"
    assert result.output.count(f"no settings for dataset 'parquet:{out}'") == 2  # before training, and after


def test_export_refuses_an_unknown_dataset_and_load_export_a_folder_without_one(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", "--dataset", "nosuchset", "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "unknown dataset" in result.output.replace("\n", " ").lower()
    with pytest.raises(DataError, match="export_poisoned|not written by|missing"):
        load_export(tmp_path / "nothing-here")
