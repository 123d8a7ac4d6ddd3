"""``python -m stn_jax schedule``: the schedule table of Self-Tuning Networks.

::

    python -m stn_jax schedule --out DIR [--dataset mnist1d|digits --hparam dropout1 --seeds 3 --steps 6000 ...]

STN tunes one hyperparameter of the MNIST-1D MLP (the others held at 0); its schedule is replayed
from scratch and compared with the best fixed value of a grid (chosen on validation loss), that
value with STN's perturbation noise, STN's final value held fixed, and STN from several initial
values (:func:`stn_jax.schedule.run_schedule_study`). Writes ``DIR/results.json`` (the study, its
configuration and the environment), ``DIR/trajectories.png`` and ``DIR/rows.png``, and prints the
table. Bad input exits with code 2 and one ``error:`` line, writing nothing.
"""

from __future__ import annotations

import argparse
import os
import sys

from trainstep.cli import _float, _nonneg_int, _positive_int
from trainstep.runner import ConfigError

HELP = "STN's hyperparameter schedule against the best fixed value, replayed and held at its final value"


def _floats(name):
    def parse(text):
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be comma-separated numbers, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{name} needs at least one value")
        return values
    return parse


def _hidden(text):
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden must be comma-separated integers, got {text!r}") from None
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--hidden needs one or two positive sizes, got {text!r}")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    from stn_jax.mlp import MLPSetup
    from stn_jax.schedule import HPARAMS, STNSettings

    setup, st = MLPSetup(), STNSettings()
    p.add_argument("--out", required=True, help="output folder (results.json, trajectories.png, rows.png)")
    p.add_argument("--dataset", choices=("mnist1d", "digits"), default="mnist1d")
    p.add_argument("--hparam", choices=HPARAMS, default="dropout1", help="the tuned hyperparameter (default dropout1)")
    p.add_argument("--seeds", type=_positive_int("--seeds"), default=3, help="seeds of every row (default 3)")
    p.add_argument("--steps", type=_positive_int("--steps"), default=setup.steps,
                   help=f"weight steps of every run (default {setup.steps})")
    p.add_argument("--hidden", type=_hidden, default=setup.hidden, help="hidden sizes, e.g. 100,100 (default)")
    p.add_argument("--warmup", type=_nonneg_int("--warmup"), default=st.warmup,
                   help=f"STN weight steps before tuning (default {st.warmup})")
    p.add_argument("--t-train", type=_positive_int("--t-train"), default=st.t_train, help="STN weight steps per cycle")
    p.add_argument("--hyper-lr", type=_float("--hyper-lr", positive=True), default=st.hyper_lr,
                   help=f"Adam step size of the hyperparameter (default {st.hyper_lr:g})")
    p.add_argument("--entropy-weight", type=_float("--entropy-weight", nonneg=True), default=st.entropy_weight,
                   help=f"weight of the perturbation's entropy (default {st.entropy_weight:g})")
    p.add_argument("--grid", type=_floats("--grid"), default=None,
                   help="fixed values of the grid search, comma-separated (default: 6 values across the range)")
    p.add_argument("--inits", type=_floats("--inits"), default=None,
                   help="STN's initial values, comma-separated; the first is the STN row's (default: 3 values)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    from stn_jax.mlp import MLPSetup
    from stn_jax.schedule import STNSettings, markdown_table, plot_rows, plot_trajectories, run_schedule_study
    from trainstep.runner import write_results

    # Everything that can be wrong with the input is checked before anything is written.
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} exists and is not a folder")
    setup = MLPSetup(dataset=args.dataset, hidden=tuple(args.hidden), steps=args.steps)
    settings = STNSettings(warmup=args.warmup, t_train=args.t_train, hyper_lr=args.hyper_lr,
                           entropy_weight=args.entropy_weight)
    log = (lambda msg: None) if args.no_progress else (lambda msg: print(msg, file=sys.stderr, flush=True))
    # A bad hyperparameter, grid or warm-up raises (exit 2) before the data loads or anything is written.
    study = run_schedule_study(setup, hparam=args.hparam, seeds=args.seeds, grid=args.grid, inits=args.inits,
                               settings=settings, log=log)
    config = {"command": "schedule", "dataset": args.dataset, "hparam": args.hparam, "seeds": args.seeds,
              "steps": args.steps, "hidden": list(setup.hidden), "warmup": args.warmup, "t_train": args.t_train,
              "hyper_lr": args.hyper_lr, "entropy_weight": args.entropy_weight, "grid": study["grid"]["values"],
              "inits": study["init_sweep"]["inits"]}
    metrics = {name: {k: row[k] for k in ("val_loss", "val_loss_std", "test_loss", "test_loss_std", "test_accuracy",
                                          "test_accuracy_std")} for name, row in study["rows"].items()}
    os.makedirs(args.out, exist_ok=True)
    plot_trajectories(study, os.path.join(args.out, "trajectories.png"))
    plot_rows(study, os.path.join(args.out, "rows.png"))
    write_results(args.out, config, metrics, wall_s=sum(study["wall_s"].values()), study=study)
    print(markdown_table(study))
    holds = study["targets"]["val_loss"]
    print(f"targets (validation loss): {', '.join(f'{k} {v}' for k, v in holds.items())}"
          f" -> {os.path.join(args.out, 'results.json')}")
    return 0

