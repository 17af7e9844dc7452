"""matplotlib on the Agg backend, for every module that draws (the report's figures, the trigger
gallery); it sits in the bottom layer so those modules need not import each other for it."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend; a ``RuntimeError`` that says how to install it where
    it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError("plots need matplotlib: pip install 'backdoorlab[plot]'") from err
    return plt
