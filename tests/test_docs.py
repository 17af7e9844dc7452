"""The docs say what the code does: counts of registered methods, the commands and options they show,
the grid copies, and the README's demo figures (issue 37, case 13)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from backdoorlab.attacks import ATTACKS
from backdoorlab.cli import app
from backdoorlab.data import DATASETS
from backdoorlab.defenses import DETECTORS, REPAIRS, SAMPLE_FILTERS, TRAINING_DEFENSES
from backdoorlab.experiments.grid import load_grid
from backdoorlab.experiments.recipes import RECIPES
from backdoorlab.models import MODELS
from backdoorlab.training.regularizers import REGULARIZERS

from .conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "docs" / "notes").glob("*.md"))]
README = (REPO / "README.md").read_text()
NUMBERS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
    "twenty": 20,
    "thirty": 30,
}


def number(words: str) -> int:
    """An English number of the README (``twenty-one``: 21)."""
    return sum(NUMBERS[part] for part in words.lower().split("-"))


#: Options whose value names a registered method, and where the names are.
NAMED = {
    "--dataset": DATASETS,
    "--model": MODELS,
    "--recipe": RECIPES,
    "--attack": ATTACKS,
    "--detector": DETECTORS,
    "--regularizer": REGULARIZERS,
    "--repair": REPAIRS,
}


def cli_options() -> dict[str, set[str]]:
    """``{"run": {"--dataset", "-a", ...}, "clip study": {...}}``: every command's option names."""

    def walk(command: Any, path: list[str]) -> Iterator[tuple[str, set[str]]]:
        if hasattr(command, "commands"):  # a group (typer vendors click, so no isinstance check)
            for name, sub in command.commands.items():
                yield from walk(sub, [*path, name])
        else:
            names = {n for p in command.params for n in (*p.opts, *p.secondary_opts) if n.startswith("-")}
            yield " ".join(path), names

    return dict(walk(typer.main.get_command(app), []))


def code_lines(text: str) -> Iterator[str]:
    """The lines of fenced code blocks (continuations joined) and every inline code span."""
    fenced = re.compile(r"```[a-z]*\n(.*?)```", re.S)
    for block in fenced.finditer(text):
        yield from block.group(1).replace("\\\n", " ").splitlines()
    for span in re.finditer(r"`([^`]+)`", fenced.sub("", text)):
        yield span.group(1).replace("\n", " ")


def documented_commands() -> Iterator[tuple[str, str, str]]:
    """``(file name, command, its arguments)`` for each ``backdoorlab COMMAND ...`` shown in the docs;
    the arguments stop at a comment, a pipe or the next shell command."""
    for path in DOCS:
        for line in code_lines(path.read_text()):
            for match in re.finditer(r"(?:^|[\s;&|(])backdoorlab ((?:clip )?[a-z][a-z-]*)(.*)", line):
                yield path.name, match.group(1), re.split(r"\s#|\||;|&&", match.group(2))[0]


def test_readme_counts_of_models_and_attacks_match_the_registries():
    models = re.search(r"([\w-]+) models behind one interface", README)
    assert models, "the README's status says how many models there are"
    registered = sorted(MODELS)
    assert number(models.group(1)) == len(registered), f"README: {models.group(0)!r}; registered: {registered}"
    image = re.search(r"([\w-]+) attacks \(", README)
    series = re.search(r"([\w-]+) series triggers", README)
    assert image and series
    assert number(image.group(1)) + number(series.group(1)) == len(list(ATTACKS)), sorted(ATTACKS)


def test_documented_commands_and_options_exist():
    commands = cli_options()
    found, wrong = 0, []
    for name, command, arguments in documented_commands():
        found += 1
        if command not in commands:
            wrong.append(f"{name}: no command 'backdoorlab {command}'")
            continue
        for option in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", arguments):
            if option not in commands[command]:
                wrong.append(f"{name}: 'backdoorlab {command}' has no option {option} ({arguments.strip()[:80]})")
    assert found > 50, "the scan finds the docs' commands"
    assert not wrong, "\n".join(wrong)


def test_documented_method_names_are_registered():
    """Every method name a documented command uses is registered, or registered by the docs' own
    example code (a plugin's ``register("name", ...)``)."""
    wrong = []
    examples = {m for path in DOCS for m in re.findall(r"\.register\(\s*\"(\w+)\"", path.read_text())}
    for name, command, arguments in documented_commands():
        if command.startswith("clip"):  # its --model names an image-text model
            continue
        for option, value in re.findall(r"(--[a-z-]+)[ =]([\w:.,-]+)", arguments):
            if option == "--defense":
                valid = {*TRAINING_DEFENSES, *REPAIRS, *SAMPLE_FILTERS}
            elif option in NAMED:
                valid = set(NAMED[option])
            else:
                continue
            for item in value.split(","):
                prefixed = item.startswith(("ucr:", "sktime:", "parquet:", "folder:"))  # ucr:ECG200, folder:PATH
                placeholder = item.isupper() or prefixed  # NAME
                if not placeholder and item not in valid | examples:
                    wrong.append(f"{name}: {option} {item} is not registered")
    assert not wrong, "\n".join(wrong)


def test_readme_grid_copies_match_their_files():
    copies = re.findall(r"```yaml\n# (examples/\S+\.yaml)\n(.*?)```", README, flags=re.S)
    assert copies, "the README shows an example grid"
    for path, text in copies:
        assert yaml.safe_load(text) == yaml.safe_load((REPO / path).read_text()), f"the README's copy of {path} differs"


def test_grids_shown_in_the_docs_are_valid(tmp_path: Path):
    blocks = [block for path in DOCS for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S)]
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        grid = tmp_path / f"grid{i}.yaml"
        grid.write_text(block)
        assert load_grid(grid).cells  # resolves and validates every cell, as `sweep --dry-run`


@pytest.mark.slow
def test_readme_demo_figures_are_what_the_default_run_prints():
    """The README's first table is `backdoorlab run` with every default (digits, on the CPU), at one
    thread as the README says (two threads give another CA on some CPUs)."""
    from backdoorlab.experiments import RunConfig, run

    row = re.search(r"│ model │([^\n]*)", README)
    assert row, "the README shows the default run's table"
    shown = [float(v) for v in re.findall(r"\d\.\d{4}", row.group(1))[:3]]
    metrics = run(RunConfig(dataset="digits", device="cpu", threads=1)).metrics
    measured = [round(metrics[k], 4) for k in ("clean_accuracy", "attack_success_rate", "robust_accuracy")]
    if shown != measured:
        pytest.fail(f"README shows CA/ASR/RA {shown}, `backdoorlab run` gives {measured}: update the README")
