"""Experiments: one run from a config to a stored result, and model files."""

from backdoorlab.experiments.config import DATASET_DEFAULTS, DatasetDefaults, RunConfig
from backdoorlab.experiments.run import RunResult, build_model, fit_attack, run, run_cached
from backdoorlab.experiments.saved_model import ModelFileError, load_model, read_metadata, save_model

__all__ = [
    "DATASET_DEFAULTS", "DatasetDefaults", "ModelFileError", "RunConfig", "RunResult", "build_model", "fit_attack",
    "load_model", "read_metadata", "run", "run_cached", "save_model",
]  # fmt: skip
