"""Grids, the results store, sweeps (resume, crashes, interruption, Ray) and the report."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from backdoorlab.experiments import RunConfig
from backdoorlab.experiments.grid import GridError, cell_key, expand, load_grid
from backdoorlab.experiments.store import ResultStore, StoreError
from backdoorlab.experiments.sweep import SweepError, sweep

from .conftest import shared_data_root

REPO = Path(__file__).resolve().parents[1]
BACKDOORLAB = [sys.executable, "-m", "backdoorlab"]

# A grid of tiny digits runs (one or two seconds each).
TINY = {
    "name": "tiny",
    "dataset": "digits",
    "epochs": 2,
    "attack": ["badnets", "blended"],
    "defense": [None, "fine_tuning"],
    "defense_options": {},
    "seed": [0, 1],
}


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- grids -------------------------------------------------------------------------------------


def test_grid_is_the_product_of_its_lists_in_file_order() -> None:
    grid = expand(TINY)
    assert grid.name == "tiny"
    assert len(grid.cells) == 8
    first = [(c.config.attack, c.config.defense, c.config.seed) for c in grid.cells[:3]]
    assert first == [("badnets", None, 0), ("badnets", None, 1), ("badnets", "fine_tuning", 0)]
    assert grid.cells[0].label == "attack=badnets, defense=none, seed=0"
    assert len({c.key for c in grid.cells}) == 8
    # every cell is resolved: the recipe's model and schedule are filled in
    assert all(c.config.model == "small_cnn" and c.config.train is not None for c in grid.cells)


def test_grid_mapping_elements_set_several_fields_and_option_lists_are_axes() -> None:
    grid = expand(
        {
            "dataset": "digits",
            "defense": [
                None,
                {"regularizer": "logit_squeezing"},
                {"defense": "fine_tuning", "defense_options": {"epochs": 3}},
            ],
            "attack_options": [{"size": 2}, {"size": 4}],
        }
    )
    assert len(grid.cells) == 6
    configs = [c.config for c in grid.cells]
    assert [c.attack_options["size"] for c in configs[:2]] == [2, 4]
    assert configs[2].regularizer == "logit_squeezing" and configs[2].defense is None
    assert configs[4].defense == "fine_tuning" and configs[4].defense_options == {"epochs": 3}


def test_a_file_without_lists_is_one_experiment(tmp_path: Path) -> None:
    grid = load_grid(write_yaml(tmp_path / "one.yaml", "dataset: digits\nattack: blended\nseed: 3\n"))
    assert len(grid.cells) == 1 and grid.name == "one"
    assert grid.cells[0].config.attack == "blended" and grid.cells[0].config.seed == 3


def test_cell_key_ignores_placement_but_not_content() -> None:
    config = RunConfig(dataset="digits").resolved()
    assert cell_key(config) == cell_key(RunConfig(dataset="digits", device="cpu", data_root="/x").resolved())
    assert cell_key(config) != cell_key(RunConfig(dataset="digits", seed=1).resolved())
    assert cell_key(config) != cell_key(RunConfig(dataset="digits", attack_options={"size": 4}).resolved())
    # a field added later leaves earlier keys alone at its default, and changes them otherwise
    added = (
        "data_seed",
        "threads",
        "deterministic",
        "preset",
        "poison_rate_of",
        "input_detector",
        "input_detector_options",
        "persistence_size",
    )
    earlier = {k: v for k, v in config.to_dict().items() if k not in ("device", "data_root", *added)}
    del earlier["train"]["milestones"]  # the dict a version before the step schedule hashed
    del earlier["train"]["min_last_batch"]  # ... and before the last batch could be skipped
    text = json.dumps(earlier, sort_keys=True, separators=(",", ":"), default=str)
    assert cell_key(config) == hashlib.sha256(text.encode()).hexdigest()[:16]
    stepped = replace(config, train=replace(config.train, schedule="step", milestones=[2]))
    assert cell_key(stepped) != cell_key(replace(config, train=replace(config.train, schedule="step")))
    assert cell_key(config) != cell_key(replace(config, data_seed=0))
    assert cell_key(config) != cell_key(replace(config, train=replace(config.train, min_last_batch=0.5)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dataset: digits\natack: [badnets]\n", r"bad\.yaml:2: unknown key 'atack' \(did you mean 'attack'\?\)"),
        (
            "dataset: digits\nattack: [badnets, nope]\n",
            r"bad\.yaml: cell 1 \(attack=nope; line 2\): unknown attack 'nope'; valid attacks: .*badnets",
        ),
        ("dataset: digits\nseed: []\n", r"bad\.yaml:2: 'seed' is an empty list"),
        ("dataset: digits\ndefense: [{defence: abl}]\n", r"bad\.yaml:2: unknown key\(s\) defence"),
        ("dataset: digits\nseed: [1, 1]\n", r"cell 1 \(seed=1; line 2\): the same experiment as cell 0"),
        ("dataset: [digits\n", r"bad\.yaml: not valid YAML"),
        ("- digits\n", r"a grid file is a mapping"),
        ("", r"the file is empty"),
        ("dataset: digits\ndefense: abl\ndefense_options: {bogus: 1}\n", r"bogus"),
    ],
)
def test_grid_errors_say_where(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(GridError, match=message):
        load_grid(write_yaml(tmp_path / "bad.yaml", text))


def test_select_keeps_the_matching_cells() -> None:
    from backdoorlab.experiments.grid import select

    grid = expand(TINY)
    chosen = select(grid, {"attack": "blended", "defense": None})
    assert [(c.config.attack, c.config.defense, c.config.seed) for c in chosen.cells] == [
        ("blended", None, 0),
        ("blended", None, 1),
    ]
    assert len(select(grid, {"train.epochs": 2}).cells) == 8
    from backdoorlab.cli import parse_selection

    either = parse_selection(["attack=blended", "seed=1", "attack=badnets"])
    assert either == {"attack": ("blended", "badnets"), "seed": 1}
    assert sorted(c.config.attack for c in select(grid, either).cells) == ["badnets", "badnets", "blended", "blended"]
    with pytest.raises(GridError, match="cannot select on 'atack'"):
        select(grid, {"atack": "blended"})


def test_missing_grid_file() -> None:
    with pytest.raises(GridError, match="does not exist"):
        load_grid("no/such/grid.yaml")


def test_every_example_grid_loads_and_docs_list_it_with_its_cell_count() -> None:
    """docs/experiments.md's table of reproduction configs names each grid of examples/ with its
    number of cells; a grid that no longer loads (a renamed option, attack or defense) or whose
    size changed fails here."""
    listed = dict(
        re.findall(
            r"^\| \[(\w+\.yaml)\]\(\.\./examples/\1\) \| .* \| (\d+) \|$",
            (REPO / "docs" / "experiments.md").read_text(),
            re.MULTILINE,
        )
    )
    root = shared_data_root()  # grids that read files from the data root (Blended's Hello Kitty) need it
    grids = {
        p.name: len(load_grid(p, data_root=str(root) if root else None).cells)
        for p in sorted((REPO / "examples").glob("*.yaml"))
        if root is not None or "leaderboard" not in p.name
    }
    assert {name: str(count) for name, count in grids.items() if name in listed} == {
        name: count for name, count in listed.items() if name in grids
    }
    unlisted = set(grids) - set(listed)  # without a data folder the leaderboard grids go unchecked
    assert not unlisted, f"examples/ grids missing from docs/experiments.md: {sorted(unlisted)}"


# --- store -------------------------------------------------------------------------------------


def test_store_records_a_cells_life(tmp_path: Path) -> None:
    grid = expand(TINY)
    with ResultStore(tmp_path) as store:
        assert store.add("tiny", grid.cells) == 8
        assert store.add("tiny", grid.cells) == 0  # idempotent
        key = grid.cells[0].key
        store.start(key)
        assert store.status([key]) == {key: "running"}
        store.release([key])
        assert store.status([key]) == {key: "pending"}
        store.start(key)
        store.finish(key, {"metrics": {"clean_accuracy": 0.9}, "timings": {"total": 1.0}, "version": "x"}, "models/a")
        store.fail(grid.cells[1].key, "Traceback...\nValueError: boom")
        done = store.records(status="done")
    assert len(done) == 1 and done[0].attempts == 2 and done[0].metrics == {"clean_accuracy": 0.9}
    assert done[0].config == grid.cells[0].config.to_dict() and done[0].model_path == "models/a"
    with ResultStore(tmp_path / "results.sqlite") as store:  # reopened: nothing lost
        failed = store.records(status="failed")
        assert [r.error for r in failed] == ["Traceback...\nValueError: boom"]
        assert len(store.records(status="pending")) == 6
        with pytest.raises(ValueError, match="unknown status 'finished'"):
            store.records(status="finished")


def test_a_store_file_copied_while_its_sweep_runs_holds_every_finished_cell(tmp_path: Path) -> None:
    """The store's file alone (what git commits, without its -wal file) has each finished cell while
    the store is still open: a leaderboard store committed mid-sweep once lacked its last cells."""
    import shutil

    grid = expand(TINY)
    with ResultStore(tmp_path) as store:
        store.add("tiny", grid.cells)
        store.start(grid.cells[0].key)
        store.finish(grid.cells[0].key, {"metrics": {"clean_accuracy": 0.9}, "timings": {"total": 1.0}})
        (tmp_path / "copy").mkdir()
        shutil.copy(tmp_path / "results.sqlite", tmp_path / "copy" / "results.sqlite")  # the -wal stays behind
        with ResultStore(tmp_path / "copy") as copied:
            assert [r.key for r in copied.records(status="done")] == [grid.cells[0].key]


def test_store_refuses_a_file_that_is_not_one(tmp_path: Path) -> None:
    (tmp_path / "results.sqlite").write_text("not a database, just text " * 100)
    with pytest.raises(StoreError, match="is not a backdoorlab results store"):
        ResultStore(tmp_path)


# --- sweeps ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny grid, swept in this process, plus one cell that crashes (its data is missing)."""
    output = tmp_path_factory.mktemp("sweep")
    summary = sweep(expand(TINY), output, executor="inline")
    assert (summary.done, summary.failed, summary.skipped) == (8, 0, 0)
    crash = expand({"name": "crash", "dataset": "mnist", "data_root": str(output / "no-data"), "epochs": 1})
    summary = sweep(crash, output, executor="inline")
    assert (summary.done, summary.failed) == (0, 1)
    return output


def test_sweep_stores_every_cell_and_a_rerun_skips_them(swept: Path) -> None:
    with ResultStore(swept) as store:
        done = store.records(status="done")
        before = {r.key: (r.attempts, r.finished) for r in done}
    assert len(done) == 8
    assert all(0.0 <= r.metrics["attack_success_rate"] <= 1.0 for r in done)
    # the stored result.json document carries the config that made it (with the trigger's full options)
    assert all(
        {k: r.result["config"][k] for k in ("attack", "defense", "seed")}
        == {k: r.config[k] for k in ("attack", "defense", "seed")}
        for r in done
    )
    summary = sweep(expand(TINY), swept, executor="inline")
    assert (summary.done, summary.skipped) == (0, 8)
    with ResultStore(swept) as store:
        assert {r.key: (r.attempts, r.finished) for r in store.records(status="done")} == before


def test_a_crashing_cell_is_recorded_and_retried_on_request(swept: Path) -> None:
    with ResultStore(swept) as store:
        [failed] = store.records(status="failed")
    assert "does not exist" in failed.error or "no-data" in failed.error
    assert "Traceback" in failed.error and failed.attempts == 1
    crash = expand({"name": "crash", "dataset": "mnist", "data_root": str(swept / "no-data"), "epochs": 1})
    assert sweep(crash, swept, executor="inline").skipped == 1  # failed cells wait for --retry-failed
    assert sweep(crash, swept, executor="inline", retry_failed=True).failed == 1
    with ResultStore(swept) as store:
        assert store.records(status="failed")[0].attempts == 2


def test_one_sweep_at_a_time_per_output(tmp_path: Path) -> None:
    import fcntl

    with open(tmp_path / ".sweep.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(SweepError, match="another sweep is writing"):
            sweep(expand(TINY), tmp_path, executor="inline")


@pytest.mark.slow
def test_worker_processes_save_models(tmp_path: Path) -> None:
    from backdoorlab.experiments import load_model

    grid = expand({"name": "two", "dataset": "digits", "epochs": 1, "seed": [0, 1]})
    summary = sweep(grid, tmp_path, executor="local", workers=2, save_models=True)
    assert summary.done == 2
    with ResultStore(tmp_path) as store:
        records = store.records(status="done")
    for record in records:
        model, config = load_model(tmp_path / record.model_path)
        assert config.seed == record.seed and model.num_classes == 10


def _count(database: Path, status: str) -> int:
    try:
        with sqlite3.connect(database, timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM cells WHERE status = ?", (status,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _sweep_process(grid: Path, output: Path) -> subprocess.Popen:
    env = {**os.environ, "BACKDOORLAB_PROGRESS": "0"}
    command = [*BACKDOORLAB, "sweep", str(grid), "--output", str(output), "--workers", "1", "--no-report"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(database: Path, done: int, process: subprocess.Popen, limit: float = 180) -> None:
    deadline = time.monotonic() + limit
    while _count(database, "done") < done:
        assert process.poll() is None, process.stdout.read().decode()  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the sweep made no progress"
        time.sleep(0.2)


class _InterruptedExecutor:
    """An executor hit by Ctrl-C at one of two moments: in ``submit`` (after the store marked the
    cell running, before the sweep holds its future) or in the worker (its future raises
    KeyboardInterrupt, as a pool worker in the same process group does)."""

    capacity, threads = 1, None

    def __init__(self, where: str) -> None:
        self.where = where

    def submit(self, fn, *args):  # noqa: ANN001, ANN201
        from concurrent.futures import Future

        if self.where == "submit":
            raise KeyboardInterrupt
        future: Future = Future()
        future.set_exception(KeyboardInterrupt())
        return future

    def restart(self) -> None:
        pass

    def shutdown(self, cancel: bool = False) -> None:
        pass


@pytest.mark.parametrize("where", ["submit", "worker"])
def test_an_interrupt_at_any_moment_leaves_no_cell_running(tmp_path: Path, where: str) -> None:
    grid = expand({"name": "interrupted", "dataset": "digits", "epochs": 1, "seed": [0, 1]})
    summary = sweep(grid, tmp_path, executor=_InterruptedExecutor(where))
    assert summary.interrupted and summary.done == 0
    assert _count(tmp_path / "results.sqlite", "running") == 0
    assert _count(tmp_path / "results.sqlite", "pending") == 2


@pytest.mark.slow
def test_a_killed_sweep_loses_nothing_and_resumes(tmp_path: Path) -> None:
    grid = write_yaml(tmp_path / "grid.yaml", "name: resume\ndataset: digits\nepochs: 3\nseed: [0, 1, 2, 3, 4, 5]\n")
    output, database = tmp_path / "out", tmp_path / "out" / "results.sqlite"
    # Ctrl-C: running cells go back to pending, exit code 130
    process = _sweep_process(grid, output)
    _wait_for(database, 1, process)
    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(60) == 130
    assert _count(database, "running") == 0 and _count(database, "done") >= 1
    # kill -9 of the whole process group mid-cell: nothing finished is lost
    process = _sweep_process(grid, output)
    _wait_for(database, _count(database, "done") + 1, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(60)
    with ResultStore(output) as store:
        finished = {r.key: (r.attempts, r.finished, r.metrics) for r in store.records(status="done")}
    assert 2 <= len(finished) < 6
    # the rerun runs only what is left
    result = subprocess.run(
        [*BACKDOORLAB, "sweep", str(grid), "--output", str(output), "--no-report"],
        env={**os.environ, "BACKDOORLAB_PROGRESS": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{6 - len(finished)} done, 0 failed, {len(finished)} already in the store" in result.stdout.replace(
        "\n", " "
    )
    with ResultStore(output) as store:
        records = store.records()
    assert all(r.status == "done" for r in records) and len(records) == 6
    assert {
        k: v for k, v in ((r.key, (r.attempts, r.finished, r.metrics)) for r in records) if k in finished
    } == finished


@pytest.mark.slow
def test_ray_executor_on_a_local_cluster(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the Ray executor needs the ray extra")
    ray_cli = Path(sys.executable).parent / "ray"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp}
    start = [
        str(ray_cli),
        "start",
        "--head",
        f"--temp-dir={ray_tmp}",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--object-store-memory=100000000",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
    ]
    started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        pytest.skip(f"could not start a local Ray cluster: {started.stderr[-500:]}")
    try:
        grid = write_yaml(tmp_path / "grid.yaml", "name: ray\ndataset: digits\nepochs: 1\nattack: [badnets, blended]\n")
        result = subprocess.run(
            [
                *BACKDOORLAB,
                "sweep",
                str(grid),
                "--output",
                str(tmp_path / "out"),
                "--executor",
                "ray",
                "--address",
                f"127.0.0.1:{port}",
                "--cpus-per-cell",
                "1",
                "--no-report",
            ],
            env={**env, "BACKDOORLAB_PROGRESS": "0"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        with ResultStore(tmp_path / "out") as store:
            records = store.records()
        assert [r.status for r in records] == ["done", "done"]
        assert all(r.metrics["attack_success_rate"] > 0.5 for r in records)
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)


# --- report ------------------------------------------------------------------------------------


def test_report_tables_and_exports(swept: Path) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from backdoorlab.report import summarize, write_report

    page = write_report(swept, gallery=False).read_text()
    with ResultStore(swept) as store:
        records = store.records()
    summary = summarize("tiny", [r for r in records if r.grid == "tiny"])
    assert summary.columns == ["attack", "defense"]
    assert [row["n"] for row in summary.rows] == [2, 2, 2, 2]
    row = summary.rows[0]
    asr = [
        r.metrics["attack_success_rate"]
        for r in records
        if r.grid == "tiny" and r.config["attack"] == "badnets" and r.config["defense"] is None
    ]
    assert row["attack_success_rate"][0] == pytest.approx(sum(asr) / 2)
    assert page.count('<table class="results">') == 1 and "Persistence under clean fine-tuning" in page
    assert "Failed cells" in page and "mnist" in page.split("Failed cells")[1]
    parquet, csv = pq.read_table(swept / "results.parquet"), pacsv.read_csv(swept / "results.csv")
    assert parquet.num_rows == csv.num_rows == 9
    assert sorted(parquet.column("status").to_pylist()) == ["done"] * 8 + ["failed"]


def test_detectability_rows_from_a_grid(tmp_path: Path) -> None:
    from backdoorlab.report import detectability

    grid = expand(
        {"name": "study", "dataset": "digits", "detector": "neural_cleanse", "poison_rate": [0, 0.1], "seed": [0, 1, 2]}
    )
    with ResultStore(tmp_path) as store:
        store.add("study", grid.cells)
        for i, cell in enumerate(grid.cells):  # backdoored models score higher, but for one overlap
            score = {0: [1.0, 2.0, 3.0], 1: [2.5, 4.0, 5.0]}[int(cell.config.poison_rate > 0)][cell.config.seed]
            metrics = {
                "clean_accuracy": 0.9,
                "attack_success_rate": 0.8 if cell.config.poison_rate else 0.1,
                "detection_score": score,
            }
            store.finish(cell.key, {"metrics": metrics, "timings": {"total": 1.0}})
        [row] = detectability(store.records())
    assert row["attack"] == "badnets" and row["poison_rate"] == 0.1 and (row["n"], row["n_clean"]) == (3, 3)
    assert row["auroc"] == pytest.approx(8 / 9)  # 8 of the 9 (backdoored, clean) pairs are ordered right
    assert row["asr"] == pytest.approx(0.8) and row["asr_repaired"] is None
    pytest.importorskip("matplotlib")
    from backdoorlab.report import plots

    assert plots.robustness_detectability([row]).startswith(b"\x89PNG")


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's)")
    pytest.importorskip("playwright", reason="the browser test drives chromium with playwright")
    return path


def test_report_renders_in_headless_chromium(swept: Path, data_root: Path) -> None:
    from playwright.sync_api import sync_playwright

    from backdoorlab.report import write_report

    path = write_report(swept, swept / "browser.html", data_root=str(data_root))
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=_chromium(),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_page()
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(path.as_uri())
        rows = page.locator("table.results tbody tr").count()
        images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        headers = page.locator("table.results th").all_inner_texts()
        browser.close()
    assert errors == []
    assert rows == 4 and headers[:2] == ["attack", "defense"] and "ASR" in headers
    assert len(images) >= 4 and all(ok for _, ok in images), images  # CA-ASR, persistence, two triggers
    assert {"CA against ASR", "Persistence under clean fine-tuning"} <= {alt for alt, _ in images}


# --- command line ------------------------------------------------------------------------------


def test_cli_sweep_and_report(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from backdoorlab.cli import app

    runner = CliRunner()
    grid = write_yaml(tmp_path / "g.yaml", "dataset: digits\nepochs: 1\nattack: [badnets, blended]\n")
    listed = runner.invoke(app, ["sweep", str(grid), "--dry-run"])
    assert listed.exit_code == 0 and "attack=blended" in listed.output
    only = runner.invoke(app, ["sweep", str(grid), "--dry-run", "--only", "attack=blended"])
    assert only.exit_code == 0 and "1 cells" in only.output and "attack=badnets" not in only.output
    none = runner.invoke(app, ["sweep", str(grid), "--only", "attack=wanet"])
    assert none.exit_code == 2 and "has attack=wanet" in " ".join(none.output.split())
    bad = runner.invoke(app, ["sweep", str(write_yaml(tmp_path / "bad.yaml", "dataset: nope\n"))])
    assert bad.exit_code == 2 and "unknown dataset 'nope'" in bad.output
    out = tmp_path / "out"
    ran = runner.invoke(app, ["sweep", str(grid), "--output", str(out), "--executor", "inline"])
    assert ran.exit_code == 0, ran.output
    assert "2 done, 0 failed" in ran.output and (out / "report.html").is_file()
    again = runner.invoke(app, ["report", str(out), "--no-gallery"])
    assert again.exit_code == 0 and "results.parquet" in again.output
    missing = runner.invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "has no results.sqlite" in " ".join(missing.output.split())
    assert json.loads((out / "results.csv").read_text().splitlines()[0].split(",")[0]) == "key"


def test_a_repair_grid_trains_its_victim_once(tmp_path, monkeypatch):
    """Cells that differ only in the repair or detector share one trained victim: the undefended
    cell trains it, the repair and detector cells reuse it (counted at the training loop), and a
    reused victim gives the repair the same figures as training it inline."""
    import importlib

    from backdoorlab.experiments import run as run_once

    module = importlib.import_module("backdoorlab.experiments.run")
    trained: list[str] = []
    original = module.train_victim

    def counting(prepared):
        trained.append(prepared.config.attack)
        return original(prepared)

    monkeypatch.setattr(module, "train_victim", counting)
    grid = expand(
        {
            "name": "repairs",
            "dataset": "digits",
            "epochs": 4,
            "train_size": 600,
            "test_size": 200,
            "trusted_size": 0.1,
            "defense": [
                None,
                {"defense": "fine_tuning", "defense_options": {"epochs": 2}},
                {"defense": "fine_pruning", "defense_options": {"epochs": 1}},
            ],
        }
    )
    summary = sweep(grid, tmp_path / "out", executor="inline")
    assert summary.done == 3 and summary.failed == 0
    assert trained == ["badnets"], "one victim trained for three cells"
    assert len(list((tmp_path / "out" / "suspects").glob("*.safetensors"))) == 1
    with ResultStore(tmp_path / "out") as store:
        results = {r.config["defense"]: r for r in store.records("done")}
    assert results["fine_tuning"].result["details"]["suspect"]["reused"] is True
    inline = run_once(grid.cells[1].config)
    assert results["fine_tuning"].metrics == pytest.approx({k: v for k, v in inline.metrics.items()})


def test_a_methods_revision_changes_its_cells_keys_and_no_other():
    """A method registered with ``revision`` > 0 (its computation changed at the same options) gets
    new cell keys, so a store never serves a result of the earlier computation; methods at revision 0
    keep their keys."""
    from backdoorlab.defenses import REPAIRS

    config = RunConfig(dataset="digits", defense="fine_tuning").resolved()
    before = cell_key(config)
    assert "revisions" not in json.dumps(config.to_dict())
    metadata = REPAIRS._metadata["fine_tuning"]
    try:
        REPAIRS._metadata["fine_tuning"] = {**metadata, "revision": 1}
        assert cell_key(config) != before
    finally:
        REPAIRS._metadata["fine_tuning"] = metadata
    assert cell_key(config) == before
    assert REPAIRS.metadata("pivotal_tuning")["revision"] == 1, "its anchor changed on 2026-12-06"


def test_a_persistence_subsample_measures_the_curve_on_it_and_shares_the_victim():
    """``persistence_size`` measures a repair's curve on seeded subsamples of the clean and the
    triggered test set, while its final metrics stay on the whole; the victim's key ignores it, so
    a sweep shares one victim between cells measured either way, and keys of cells without it stay."""
    import torch

    from backdoorlab.evaluation import evaluate_backdoor
    from backdoorlab.experiments.grid import suspect_key
    from backdoorlab.experiments.run import apply_repair, evaluate, persistence_sets, prepare, train_victim
    from backdoorlab.options import OptionError

    base = RunConfig(dataset="digits", epochs=2, train_size=600, test_size=200, trusted_size=0.1)
    sub = replace(base, persistence_size=50)
    assert suspect_key(sub.resolved()) == suspect_key(base.resolved())
    assert cell_key(sub.resolved()) == cell_key(base.resolved()), "no repair: nothing it changes"
    base = replace(base, defense="fine_tuning", defense_options={"epochs": 2})
    sub = replace(base, persistence_size=50)
    assert suspect_key(sub.resolved()) == suspect_key(base.resolved())
    assert cell_key(sub.resolved()) != cell_key(base.resolved())
    with pytest.raises(OptionError, match="persistence_size 1 is ambiguous"):
        replace(base, persistence_size=1).resolved()
    prepared = prepare(sub.resolved())
    model, _ = train_victim(prepared)
    test, triggered = persistence_sets(prepared)
    assert len(test) == 50 and len(triggered.true_labels) == 50 and len(prepared.test_set) == 200
    again, _ = persistence_sets(prepared)
    assert torch.equal(again.labels, test.labels), "the same subsample each time"
    repaired, metrics, details, _ = apply_repair(prepared, model, "fine_tuning", sub.defense_options)
    assert details["persistence_test_sizes"] == [50, 50]
    on_subsample = evaluate_backdoor(model, test, triggered, device=prepared.device)
    assert details["persistence"][0] == {"checkpoint": 0, **{k: round(v, 4) for k, v in on_subsample.items()}}
    assert metrics == evaluate(prepared, repaired), "the final metrics on the whole test sets"


def test_every_committed_stores_cells_keep_their_keys() -> None:
    """The stores under benchmarks/results resume: each stored cell's config gives its stored key
    today. A config field added without care (one that enters keys at its default) fails here."""
    from backdoorlab.experiments.clip_cells import CELL_KIND, ClipCellConfig

    from .conftest import REPO

    stores = sorted((REPO / "benchmarks" / "results").glob("*/results.sqlite"))
    assert stores, "no committed store found"
    checked = 0
    for path in stores:
        with ResultStore(path) as store:
            for record in store.records():
                if record.config.get("kind") == CELL_KIND:
                    key = ClipCellConfig.from_dict(record.config).key()
                else:
                    key = cell_key(RunConfig.from_dict(record.config))
                assert key == record.key, f"{path}: cell {record.label} has key {record.key}, its config gives {key}"
                checked += 1
    assert checked > 50


def test_a_field_added_to_a_config_is_left_out_of_keys_at_its_default() -> None:
    """No list to keep by hand: a field the keys were not first defined with is dropped at its
    default (:func:`~backdoorlab.experiments.grid.added_fields`)."""
    from dataclasses import dataclass

    from backdoorlab.experiments.grid import KEYED_FIELDS, added_fields

    @dataclass
    class Extended(RunConfig):
        brand_new: int = 7

    assert added_fields(Extended, KEYED_FIELDS) == {**added_fields(RunConfig, KEYED_FIELDS), "brand_new": 7}
