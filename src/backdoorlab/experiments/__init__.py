"""Experiments: one run from a config to a stored result."""

from backdoorlab.experiments.config import DATASET_DEFAULTS, DatasetDefaults, RunConfig
from backdoorlab.experiments.run import RunResult, build_model, fit_attack, run, run_cached

__all__ = ["DATASET_DEFAULTS", "DatasetDefaults", "RunConfig", "RunResult", "build_model", "fit_attack", "run", "run_cached"]
