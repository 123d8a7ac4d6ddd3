"""The experiments ``make reproduce`` runs, in report order. Paper packages append theirs here."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple


class Section(NamedTuple):
    """What an experiment contributes to ``results/REPORT.md``."""

    title: str
    markdown: str  # tables and text; image links relative to the results folder


class Experiment(NamedTuple):
    name: str  # folder under results/
    module: str  # module with run(out_dir: str, scale: str) -> Section


EXPERIMENTS: list[Experiment] = [
    Experiment("trainstep_baselines", "experiments.trainstep_baselines"),
    Experiment("comm_sgd_local", "experiments.comm_sgd_local"),
    Experiment("comm_sgd_tradeoffs", "experiments.comm_sgd_tradeoffs"),
    Experiment("comm_sgd_mlp", "experiments.comm_sgd_mlp"),
    Experiment("stn_ridge", "experiments.stn_ridge"),
    Experiment("stn_mlp", "experiments.stn_mlp"),
    Experiment("stn_schedule", "experiments.stn_schedule"),
    Experiment("meta_rules", "experiments.meta_rules"),
]

SCALES = ("small", "large")


def load(experiment: Experiment) -> Callable[[str, str], Section]:
    import importlib

    return importlib.import_module(experiment.module).run
