"""The README's promises: its Python example runs, and CI runs exactly its test command."""

from __future__ import annotations

import re

import pytest

from backdoorlab.training import resolve_device

from .conftest import REPO

README = (REPO / "README.md").read_text()


@pytest.mark.slow
def test_readme_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "the README has a Python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    metrics = eval(printed.strip().splitlines()[-1])  # the example prints the metrics dict
    assert metrics["attack_success_rate"] > 0.9 and metrics["clean_accuracy"] > 0.9


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    test_command = next(c.strip() for c in commands if "pytest" in c)
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert ci_lines == [test_command]


def test_unavailable_device_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
