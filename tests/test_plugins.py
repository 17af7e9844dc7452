"""Plugins: an installed package's entry points (``backdoorlab.attacks``, ``backdoorlab.models``...)
register methods that the registries, ``backdoorlab list`` in a new process and a sweep's worker
processes see without importing anything; a broken plugin warns, a clashing one raises.

The plugins are real distributions as pip leaves them, made without pip: modules and a
``<name>-0.1.dist-info`` folder (``METADATA``, ``entry_points.txt``) in a folder put on the path,
where ``importlib.metadata`` finds them."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import pytest
import torch

from backdoorlab import plugins
from backdoorlab.attacks import ATTACKS, create_trigger
from backdoorlab.defenses import TRAINING_DEFENSES
from backdoorlab.models import MODELS
from backdoorlab.plugins import PluginError, PluginWarning, load_plugins

from .conftest import REPO

ATTACK_MODULE = '''
"""A plugin's attack: a white 2x2 patch in the top-left corner."""
from backdoorlab.attacks import ATTACKS, Trigger


@ATTACKS.register("myplugin_attack", "a plugin's attack: a white 2x2 patch, top left")
class TopLeft(Trigger):
    def apply(self, x, generator):
        out = x.clone()
        out[:, :, :2, :2] = 1.0
        return out
'''

MODEL_MODULE = '''
"""A plugin's model, registered by a callable (the entry point's value ``module:register``)."""
from torch import nn

from backdoorlab.models import MODELS, Classifier
from backdoorlab.options import PositiveInt


def register():
    @MODELS.register("myplugin_model", "a plugin's model: one convolution")
    def one_conv(num_classes, in_channels, mean, std, width: PositiveInt = 16):
        body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        return Classifier(body, width, num_classes, mean, std)
'''

PLUGIN_ENTRY_POINTS = """
[backdoorlab.attacks]
myplugin = myplugin_bl.attacks

[backdoorlab.models]
myplugin = myplugin_bl.models:register
"""

PLUGIN_MODULES = {"myplugin_bl": ("myplugin_bl", "myplugin_bl.attacks", "myplugin_bl.models")}


def make_distribution(root: Path, name: str, entry_points: str, files: dict[str, str]) -> Path:
    """Write distribution ``name`` into ``root``: ``files`` (relative path -> text) and its
    ``name-0.1.dist-info`` with ``METADATA`` and ``entry_points.txt``; returns ``root``."""
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(dedent(text))
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(dedent(entry_points))
    return root


def make_plugin(root: Path) -> Path:
    """The plugin ``myplugin_bl``: an attack (a module entry point) and a model (a callable one)."""
    files = {
        "myplugin_bl/__init__.py": "",
        "myplugin_bl/attacks.py": ATTACK_MODULE,
        "myplugin_bl/models.py": MODEL_MODULE,
    }
    return make_distribution(root, "myplugin_bl", PLUGIN_ENTRY_POINTS, files)


def make_broken(root: Path) -> Path:
    """``broken_bl``: a defense entry point whose module raises on import."""
    files = {"broken_bl.py": "raise RuntimeError('the plugin is broken')\n"}
    return make_distribution(root, "broken_bl", "[backdoorlab.defenses]\nbroken = broken_bl\n", files)


@pytest.fixture
def fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No plugin loaded yet in this process; afterwards the registries, modules and path as before
    (the suite's other tests see no plugin method)."""
    registries = (ATTACKS, MODELS, TRAINING_DEFENSES)
    before = [set(r._items) for r in registries]
    modules = set(sys.modules)
    monkeypatch.setattr(plugins, "_state", plugins._PluginState())
    yield monkeypatch
    for r, names in zip(registries, before):
        for name in set(r._items) - names:
            r.unregister(name)
    for name in set(sys.modules) - modules:
        if name.split(".")[0] in ("myplugin_bl", "broken_bl", "clash_bl", "my_package"):
            del sys.modules[name]


def on_path(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    monkeypatch.syspath_prepend(str(folder))
    importlib.invalidate_caches()


def test_the_registries_see_a_plugins_methods_at_the_first_lookup(tmp_path: Path, fresh_plugins) -> None:
    on_path(fresh_plugins, make_plugin(tmp_path))
    assert "myplugin_attack" not in ATTACKS._items  # nothing imported the plugin yet
    assert "myplugin_attack" in ATTACKS.names()  # the lookup loaded it, and the model's too
    assert "myplugin_model" in MODELS
    assert ATTACKS.origin("myplugin_attack") == MODELS.origin("myplugin_model") == "myplugin_bl"
    assert ATTACKS.origin("badnets") is None
    model = MODELS.create("myplugin_model", num_classes=10, in_channels=1, mean=[0.5], std=[0.5], width=4)
    assert model.num_classes == 10
    plugins = {(p.group, p.name, p.value, p.distribution, p.error) for p in load_plugins()}
    assert plugins == {
        ("backdoorlab.attacks", "myplugin", "myplugin_bl.attacks", "myplugin_bl", None),
        ("backdoorlab.models", "myplugin", "myplugin_bl.models:register", "myplugin_bl", None),
    }
    # loaded once: a second load (again=True, after installing a package) would raise on calling the
    # model's callable twice (registered twice); it loads only entry points not loaded yet
    assert len(load_plugins(again=True)) == 2


def test_a_broken_plugin_warns_naming_it_and_the_others_still_load(tmp_path: Path, fresh_plugins) -> None:
    on_path(fresh_plugins, make_broken(make_plugin(tmp_path)))
    with pytest.warns(PluginWarning, match=r"'broken = broken_bl' \(backdoorlab.defenses, distribution broken_bl\)"):
        assert "myplugin_attack" in ATTACKS
    assert "RuntimeError: the plugin is broken" in str(next(p.error for p in load_plugins() if p.error))
    assert "abl" in TRAINING_DEFENSES.names()  # the unrelated registries work


def test_a_plugin_that_takes_a_built_in_name_raises_naming_both(tmp_path: Path, fresh_plugins) -> None:
    clash = """
    from backdoorlab.attacks import ATTACKS, BadNets


    @ATTACKS.register("badnets")
    class Mine(BadNets):
        pass
    """
    make_distribution(tmp_path, "clash_bl", "[backdoorlab.attacks]\nclash = clash_bl\n", {"clash_bl.py": clash})
    on_path(fresh_plugins, make_plugin(tmp_path))
    with pytest.raises(PluginError) as raised:
        ATTACKS.get("badnets")
    message = str(raised.value)
    assert message == (
        "attack 'badnets' is registered twice: by the built-in backdoorlab.attacks.triggers.BadNets, and by "
        "plugin 'clash = clash_bl' (backdoorlab.attacks, distribution clash_bl) as clash_bl.Mine; rename one of them"
    )
    # the clash is refused, the other plugin loaded, and later lookups work
    assert ATTACKS.get("badnets").__module__ == "backdoorlab.attacks.triggers"
    assert "myplugin_attack" in ATTACKS


def test_the_docs_plugin_works_as_written(tmp_path: Path, fresh_plugins) -> None:
    """docs/library.md's Plugins section: its pyproject entry points and its module, installed."""
    tomllib = pytest.importorskip("tomllib")
    section = (REPO / "docs" / "library.md").read_text().split("\n## Plugins", 1)[1].split("\n## ", 1)[0]
    pyproject = tomllib.loads(re.search(r"```toml\n(.*?)```", section, flags=re.S).group(1))
    module = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    groups = pyproject["project"]["entry-points"]
    text = "".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) for group, entries in groups.items()
    )
    files = {"my_package/__init__.py": "", "my_package/plugin.py": module}
    on_path(fresh_plugins, make_distribution(tmp_path, "my_package", text, files))
    images = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    triggered = create_trigger("corner_square", (1, 8, 8))(images)
    assert ATTACKS.origin("corner_square") == "my_package"
    assert triggered[:, :, :2, :2].eq(255).all() and triggered.sum() == 3 * 4 * 255


def test_list_in_a_new_process_shows_plugin_methods_and_survives_a_broken_plugin(tmp_path: Path) -> None:
    folder = make_broken(make_plugin(tmp_path))
    path = os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "300", "BACKDOORLAB_PROGRESS": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "backdoorlab", "list"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = {line.split()[1]: line for line in done.stdout.splitlines() if "myplugin_" in line}
    assert "a plugin's attack" in lines["myplugin_attack"] and "myplugin_bl" in lines["myplugin_attack"]
    assert "a plugin's model" in lines["myplugin_model"] and "myplugin_bl" in lines["myplugin_model"]
    assert "badnets" in done.stdout and "fine_tuning" in done.stdout
    warning = " ".join(done.stderr.split())
    assert "plugin 'broken = broken_bl' (backdoorlab.defenses, distribution broken_bl) failed to load" in warning
    assert "RuntimeError: the plugin is broken" in warning


@pytest.mark.slow
def test_a_sweeps_worker_processes_run_a_plugins_attack_and_model(tmp_path: Path, fresh_plugins) -> None:
    """Two cells in a spawned worker process, which import nothing of the plugin's: the plugin's attack
    on the recipe's model (it takes: the patch is learnt), and BadNets on the plugin's model."""
    from backdoorlab.experiments.grid import expand
    from backdoorlab.experiments.store import ResultStore
    from backdoorlab.experiments.sweep import sweep

    on_path(fresh_plugins, make_plugin(tmp_path / "plugin"))
    cells = ["myplugin_attack", {"attack": "badnets", "model": "myplugin_model"}]
    grid = expand({"name": "plugins", "dataset": "digits", "epochs": 1, "attack": cells})
    summary = sweep(grid, tmp_path / "out", executor="local", workers=1)
    with ResultStore(tmp_path / "out") as store:
        records = {r.config["attack"]: r for r in store.records()}
    assert (summary.done, summary.failed) == (2, 0), [r.error for r in records.values()]
    assert records["badnets"].config["model"] == "myplugin_model"
    plugin = records["myplugin_attack"]
    assert plugin.config["model"] == "small_cnn"
    assert plugin.metrics["clean_accuracy"] > 0.6 and plugin.metrics["attack_success_rate"] > 0.6, plugin.metrics
