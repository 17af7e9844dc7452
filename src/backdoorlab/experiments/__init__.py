"""Experiments: one run from a config to a stored result, and model files."""

from backdoorlab.experiments.backdoorbench_import import BackdoorBenchAttack, BackdoorBenchFileError, load_backdoorbench
from backdoorlab.experiments.config import RunConfig
from backdoorlab.experiments.export import Export, export_poisoned, load_export
from backdoorlab.experiments.recipes import RECIPES, Recipe, recipe_for
from backdoorlab.experiments.run import ModelSpec, RunResult, build_model, fit_attack, run
from backdoorlab.experiments.saved_model import ModelFileError, load_model, read_metadata, save_model

__all__ = [
    "RECIPES",
    "BackdoorBenchAttack",
    "BackdoorBenchFileError",
    "Export",
    "ModelFileError",
    "ModelSpec",
    "Recipe",
    "RunConfig",
    "RunResult",
    "build_model",
    "export_poisoned",
    "fit_attack",
    "load_backdoorbench",
    "load_export",
    "load_model",
    "read_metadata",
    "recipe_for",
    "run",
    "save_model",
]
