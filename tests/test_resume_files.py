"""Issue 37, resume and files: a stored file is reused only for the config that made it, files are
written whole or not at all, a corrupt input is named in a one-line error, a sweep's worker dies
with its parent, and a defense gets nothing of the evaluation through its model factory or its
observer (by construction, not by convention)."""

from __future__ import annotations

import copy
import gc
import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backdoorlab.attacks.poisoning import PoisonedDataset, TriggeredTestSet
from backdoorlab.attacks.triggers import Trigger
from backdoorlab.data import TensorDataset
from backdoorlab.defenses import REPAIRS, TRAINING_DEFENSES, DefenseOutcome, Repair, TrainingDefense
from backdoorlab.experiments import ModelFileError, RunConfig, load_model, run, save_model
from backdoorlab.experiments.grid import Cell
from backdoorlab.experiments.run import (
    ModelSpec,
    Prepared,
    apply_repair,
    evaluate,
    prepare,
    train_victim,
)
from backdoorlab.experiments.store import ResultStore, StoreError
from backdoorlab.files import write_json
from backdoorlab.models import create_model
from backdoorlab.training.loop import train

SMALL = {"dataset": "digits", "epochs": 1, "train_size": 600, "test_size": 200, "trusted_size": 0.1}
#: What a defense must not reach: the evaluation's data and the attack.
FORBIDDEN = (Prepared, PoisonedDataset, TriggeredTestSet, Trigger, TensorDataset)


def reachable(root: object) -> list[object]:
    """Every object reachable from ``root`` through instances, containers and closures (not through
    classes, modules or a function's globals): what a defense holding ``root`` can read."""
    seen, stack, out = set(), [root], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)):
            continue
        seen.add(id(obj))
        out.append(obj)
        if isinstance(obj, types.FunctionType):
            stack += [cell.cell_contents for cell in obj.__closure__ or ()] + list(obj.__defaults__ or ())
        elif isinstance(obj, types.MethodType):
            stack += [obj.__self__, obj.__func__]
        elif not isinstance(obj, torch.Tensor):
            stack += gc.get_referents(obj)
    return out


def one_line_naming(err: BaseException, path: Path) -> str:
    message = str(err)
    assert str(path) in message and "\n" not in message, message
    return message


# -- resume only what matches ------------------------------------------------------------------


@pytest.mark.slow
def test_clip_study_rerun_with_another_config_keeps_both_apart(tmp_path: Path) -> None:
    """Issue case 2: the rerun with ``--poison-rate 0.5 --seed 7 --target 3`` reused the old model
    and attack results under the new labels. Now each cell's key is its config: the rerun trains its
    own models beside the first study's, and its table shows its own cells only."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from typer.testing import CliRunner

    from backdoorlab.cli import app
    from backdoorlab.experiments.store import ResultStore

    args = [
        "clip",
        "study",
        "--output",
        str(tmp_path),
        "--dataset",
        "digits",
        "--attacks",
        "badnet_rand",
        "--cleanings",
        "fine_tuning",
        "--train-size",
        "256",
        "--clean-size",
        "128",
        "--test-size",
        "100",
        "--epochs",
        "1",
        "--clean-epochs",
        "1",
        "--eval-every",
        "100",
        "-m",
        "image_size=32",
    ]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    suspects = sorted((tmp_path / "suspects").iterdir())
    stamps = [f.stat().st_mtime_ns for f in suspects]
    first_table = (tmp_path / "clip_study.md").read_text()

    again = CliRunner().invoke(app, [*args, "--poison-rate", "0.5", "--seed", "7", "--target", "3"])
    assert again.exit_code == 0, again.output
    with ResultStore(tmp_path) as store:
        records = store.records()
    assert len(records) == 6 and all(r.status == "done" for r in records)
    assert {(r.config["seed"], r.config["target"], r.config["poison_rate"]) for r in records} == {
        (0, 0, 0),
        (0, 0, 0.1),
        (7, 3, 0),
        (7, 3, 0.5),
    }
    assert [f.stat().st_mtime_ns for f in suspects] == stamps, "the first study's models are not overwritten"
    assert len(list((tmp_path / "suspects").iterdir())) == 4, "the rerun trained its own two"
    second = [r for r in records if r.config["seed"] == 7]
    table = (tmp_path / "clip_study.md").read_text()
    asr = second[1].metrics  # the poisoned model's row, from the rerun's cells only
    assert f"{asr['clean_accuracy']:.3f} / {asr['attack_success_rate']:.3f}" in table and table != first_table


@pytest.mark.slow
def test_clip_study_names_a_corrupt_shared_model_and_runs_no_pickle(tmp_path: Path) -> None:
    """Issue case 11: a shared model file is read as safetensors, never unpickled: a pickle that would
    run code there fails its cells with an error naming the file, and its code never runs."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from backdoorlab.experiments.clip_study import ClipStudyConfig, clip_study, clip_study_grid
    from backdoorlab.experiments.grid import suspect_key

    config = ClipStudyConfig(
        dataset="digits", attacks=("badnet_rand",), cleanings=(), train_size=64, clean_size=32, test_size=20
    )
    config.model_options = {"image_size": 32}
    clean_cell = clip_study_grid(config).cells[0].config
    marker = tmp_path / "ran"
    path = tmp_path / "suspects" / f"{suspect_key(clean_cell)}.safetensors"
    path.parent.mkdir()
    torch.save({"weight": _RunsCode(str(marker))}, path)
    summary, records = clip_study(config, tmp_path)
    assert (summary.failed, summary.done) == (1, 1), "the clean cell fails; the poisoned one trains its own model"
    failed = next(r for r in records if r.status == "failed")
    last = failed.error.strip().splitlines()[-1]
    assert str(path) in last and "not a readable model state" in last, last
    assert not marker.exists(), "the pickled code ran"


class _RunsCode:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.path), "ran"))


def test_detectability_refuses_a_folder_of_the_earlier_layout(tmp_path: Path) -> None:
    """A study folder written before the study used the results store (``rate-*/seed-*/result.json``)
    is refused with the reason, not mixed with a new store."""
    from typer.testing import CliRunner

    from backdoorlab.cli import app

    write_json(tmp_path / "rate-0.1" / "seed-0" / "result.json", {"config": {}, "scores": {}})
    result = CliRunner().invoke(app, ["detectability", "--output", str(tmp_path)])
    assert result.exit_code == 2
    assert (
        "written by an earlier version" in " ".join(result.output.split())
        and not (tmp_path / "results.sqlite").exists()
    )


# -- atomic writes -----------------------------------------------------------------------------


def test_an_interrupted_write_leaves_the_old_file_and_no_partial_one(tmp_path: Path, monkeypatch) -> None:
    """result.json and model files are written to a temporary file, then renamed: a write that dies
    half-way leaves the previous file intact and no temporary file behind."""
    result = run(RunConfig(**SMALL))
    path = result.write(tmp_path)
    before = path.read_bytes()
    model_path = save_model(tmp_path / "model.safetensors", result.model, RunConfig(**SMALL))
    model_before = model_path.read_bytes()

    def half_then_fail(self: Path, data: bytes) -> int:
        with open(self, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    monkeypatch.setattr(Path, "write_text", lambda self, text, *args, **kwargs: half_then_fail(self, text.encode()))
    result.metrics["clean_accuracy"] = 0.0  # a different document, so a partial write would show
    with pytest.raises(OSError, match="disk full"):
        result.write(tmp_path)

    def save_half(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr("backdoorlab.experiments.saved_model.save_file", save_half)
    with pytest.raises(OSError, match="disk full"):
        save_model(model_path, result.model, RunConfig(**SMALL))
    assert path.read_bytes() == before and model_path.read_bytes() == model_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "result.json"], "no temporary file left"


# -- corrupt inputs name their file --------------------------------------------------------------


def _model_file(tmp_path: Path) -> Path:
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    return save_model(tmp_path / "good.safetensors", model, RunConfig(dataset="digits", model="small_cnn"))


@pytest.mark.parametrize("damage", ["no_config", "bad_json", "truncated", "bad_header"])
def test_a_corrupt_model_file_is_named(tmp_path: Path, damage: str) -> None:
    good = _model_file(tmp_path)
    path = tmp_path / f"{damage}.safetensors"
    weights = {"w": torch.zeros(2)}
    if damage == "no_config":
        save_file(weights, str(path), metadata={"backdoorlab": json.dumps({"format": 1, "shape": {"num_classes": 10}})})
    elif damage == "bad_json":
        save_file(weights, str(path), metadata={"backdoorlab": '{"format": 1, "config": {'})
    elif damage == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}xxx")
    with pytest.raises(ModelFileError) as err:
        load_model(path)
    one_line_naming(err.value, path)
    assert load_model(good)[1].model == "small_cnn"


def test_a_bad_store_row_or_page_is_named(tmp_path: Path) -> None:
    config = RunConfig(dataset="digits").resolved()
    with ResultStore(tmp_path / "rows") as store:
        store.add("grid", [Cell(config, "cell-a", "a")])
    db = sqlite3.connect(tmp_path / "rows" / "results.sqlite")
    db.execute("""UPDATE cells SET metrics = '{"clean_accuracy": 0.9'""")
    db.commit()
    db.close()
    with ResultStore(tmp_path / "rows") as store, pytest.raises(StoreError) as err:
        store.records()
    assert "cell cell-a's metrics is not valid JSON" in one_line_naming(err.value, store.path)

    with ResultStore(tmp_path / "pages") as store:  # a damaged page that opening the store does not read
        store.add("grid", [Cell(config, f"cell-{i}", str(i)) for i in range(40)])
    path = tmp_path / "pages" / "results.sqlite"
    data = bytearray(path.read_bytes())
    middle = len(data) // 4096 // 2 * 4096
    data[middle : middle + 4096] = b"\xa5" * 4096
    path.write_bytes(bytes(data))
    with ResultStore(path) as store, pytest.raises(StoreError) as err:
        store.records()
    assert "malformed" in one_line_naming(err.value, path)


# -- workers die with their parent ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to tell a zombie from a live worker")
def test_a_worker_dies_when_its_sweep_is_killed(tmp_path: Path) -> None:
    """Issue case 9: after ``kill -9`` of the sweep's main process its worker trained on for minutes."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent("""
        import os, time
        from backdoorlab.experiments.executors import LocalExecutor

        if __name__ == "__main__":
            executor = LocalExecutor(1)
            worker = executor.submit(os.getpid).result()
            executor.submit(time.sleep, 300)  # a long cell
            print(worker, flush=True)
            time.sleep(300)
    """)
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(parent.stdout.readline())
        assert _alive(worker)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(worker), "the worker outlived its parent by 15 s"
    finally:
        parent.kill()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "State:\tZ" not in status and "State:\tX" not in status


# -- defenses get nothing of the evaluation, by construction ------------------------------------------


def test_a_training_defense_gets_a_model_spec_with_nothing_of_the_run(monkeypatch) -> None:
    """Issue case 10: the factory was ``lambda: build_model(config, prepared.train_set)``, whose
    closure reached the poison mask, the test set, the trigger and the target."""
    seen = {}

    class Spy(TrainingDefense):
        def train(self, data, build_model, ctx):  # noqa: ANN001, ANN201
            seen["factory"], seen["ctx"] = build_model, ctx
            model = build_model()
            train(model, data, ctx.recipe, device=ctx.device, seed=ctx.seed)
            return DefenseOutcome(model)

    with TRAINING_DEFENSES.temporary("spy", Spy, "test spy"):
        run(RunConfig(**SMALL, defense="spy"))
    factory = seen["factory"]
    assert isinstance(factory, ModelSpec) and not isinstance(factory, types.FunctionType)
    assert pickle.loads(pickle.dumps(factory)) == factory
    assert (factory.num_classes, factory.in_channels) == (10, 1)
    assert all(isinstance(v, (str, int, float, tuple)) for v in vars(factory).values())
    held = reachable(factory)
    assert not [type(o).__name__ for o in held if isinstance(o, (*FORBIDDEN, torch.Tensor, RunConfig))]
    assert not [type(o).__name__ for o in reachable(seen["ctx"]) if isinstance(o, (*FORBIDDEN, RunConfig))]
    # the closure the old factory was: the same walk finds the run's data behind it
    prepared = prepare(RunConfig(**SMALL))
    old = lambda: (prepared, prepared.config)  # noqa: E731 - the shape of the replaced factory
    assert any(isinstance(o, FORBIDDEN) for o in reachable(old)), "the walk must see through a closure"


def test_the_repair_observer_holds_no_measurement() -> None:
    """Issue case 10: the observer was the persistence recorder, holding the prepared run and the
    measured curve. Now it only copies the model; the curve is measured after the repair returns."""
    seen = {}

    class Spy(Repair):
        checkpoint_unit = "epoch"

        def repair(self, model, trusted, ctx):  # noqa: ANN001, ANN201
            model, observer = copy.deepcopy(model), ctx.observer
            seen["returns"] = observer(model, 0)
            held = reachable(ctx)  # the observer and everything else the context holds
            seen["held"] = [type(o).__name__ for o in held if isinstance(o, FORBIDDEN)]
            seen["metrics"] = [o for o in held if isinstance(o, dict) and "attack_success_rate" in o]
            with torch.no_grad():  # a model that predicts one class: its own snapshot must show it
                model.fc.weight.zero_()
                model.fc.bias.zero_()
            observer(model, 1)
            return DefenseOutcome(model)

    prepared = prepare(RunConfig(**SMALL))
    model, _ = train_victim(prepared)
    suspect = evaluate(prepared, model)
    with REPAIRS.temporary("spy_repair", Spy, "test spy"):
        _, metrics, details, _ = apply_repair(prepared, model, "spy_repair", {})
    assert seen["returns"] is None and seen["held"] == [] and seen["metrics"] == []
    curve = details["persistence"]
    assert [point["checkpoint"] for point in curve] == [0, 1] and details["persistence_unit"] == "epoch"
    assert curve[0] == {"checkpoint": 0, **{k: round(v, 4) for k, v in suspect.items()}}, "its own snapshot"
    assert curve[1] == {"checkpoint": 1, **{k: round(v, 4) for k, v in metrics.items()}}, "the zeroed head"
    assert curve[0]["clean_accuracy"] != curve[1]["clean_accuracy"]
