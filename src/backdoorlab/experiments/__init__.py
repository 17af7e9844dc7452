"""Experiments: one run from a config to a stored result."""

from backdoorlab.experiments.config import DATASET_DEFAULTS, DatasetDefaults, RunConfig
from backdoorlab.experiments.run import RunResult, run

__all__ = ["DATASET_DEFAULTS", "DatasetDefaults", "RunConfig", "RunResult", "run"]
