"""``python -m stn_jax``: Self-Tuning Networks from the shell.

``ridge`` is the contract::

    python -m stn_jax ridge (--data F.npz | --synthetic) --method stn|delta-stn|unrolled --out DIR \\
        [--seed S --cycles N --lr LR --hyper-lr LR ...]

It writes ``DIR/results.json`` with ``weight_decay`` (the tuned value), ``val_loss`` (of the exact
ridge solution at it), ``val_loss_model`` (of the method's own weights), ``weight_decay_closed_form``
(the optimum), ``regret``, ``log10_ratio`` and the weight-decay ``schedule``.

Bad input exits with code 2 and one ``error:`` line, writing nothing; a non-finite loss with code 3.

Each subcommand is a :class:`Command` in :data:`COMMANDS` (its help, a function adding its arguments
and a function running it), so another module adds one without touching the others.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional

from stn_jax import mlp_cli, schedule_cli
from trainstep.cli import _float, _nonneg_int, _positive_int, run_main
from trainstep.runner import ConfigError


class Command(NamedTuple):
    """A subcommand: ``add_arguments(parser)`` declares its options, ``run(args) -> exit code`` runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---------------------------------------------------------------------------------------------
# ridge


def _ridge_arguments(p: argparse.ArgumentParser) -> None:
    from stn_jax.ridge import DEFAULT_CYCLES, METHODS

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="an .npz file with X_train (n, d), y_train (n,), X_val (m, d), y_val (m,)")
    src.add_argument("--synthetic", action="store_true",
                     help="a synthetic problem (50 training and 200 validation examples, d = 30) drawn with --seed")
    p.add_argument("--method", choices=METHODS, default="stn", help="how the weight decay is tuned (default stn)")
    p.add_argument("--out", required=True, help="output folder (results.json, checkpoints/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the run and of the synthetic problem")
    p.add_argument("--cycles", type=_positive_int("--cycles"), default=None,
                   help="STN cycles, or outer steps of unrolled (default: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_CYCLES.items()) + ")")
    p.add_argument("--warmup", type=_nonneg_int("--warmup"), default=0, help="STN weight steps before the first cycle")
    p.add_argument("--t-train", type=_positive_int("--t-train"), default=5, help="STN weight steps per cycle")
    p.add_argument("--t-val", type=_positive_int("--t-val"), default=1, help="STN hyper steps per cycle")
    p.add_argument("--lr", type=_float("--lr", positive=True), default=1e-2, help="Adam step size of the STN weights")
    p.add_argument("--hyper-lr", type=_float("--hyper-lr", positive=True), default=3e-2,
                   help="Adam step size of log(weight decay)")
    p.add_argument("--init-weight-decay", type=_float("--init-weight-decay", positive=True), default=1e-2)
    p.add_argument("--perturb-scale", type=_float("--perturb-scale", positive=True), default=0.5,
                   help="initial perturbation scale of log(weight decay) (STN)")
    p.add_argument("--entropy-weight", type=_float("--entropy-weight", nonneg=True), default=1e-3,
                   help="weight of the perturbation's entropy in the hyper objective (STN)")
    p.add_argument("--inner-steps", type=_positive_int("--inner-steps"), default=50,
                   help="gradient-descent steps differentiated per outer step (unrolled)")
    p.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"), default=None,
                   help="cycles per chunk and checkpoint (default: cycles/20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _ridge(args: argparse.Namespace) -> int:
    from stn_jax.ridge import RidgeConfig, load_ridge_npz, run_ridge
    from trainstep.data import make_ridge_problem
    from trainstep.runner import write_results

    # Everything that can be wrong with the input is checked before anything is written.
    config = RidgeConfig(method=args.method, cycles=args.cycles, warmup=args.warmup, t_train=args.t_train,
                         t_val=args.t_val, lr=args.lr, hyper_lr=args.hyper_lr,
                         init_weight_decay=args.init_weight_decay, init_scale=args.perturb_scale,
                         entropy_weight=args.entropy_weight, inner_steps=args.inner_steps, seed=args.seed)
    if args.data is not None:
        problem = load_ridge_npz(args.data)
        data = f"npz:{os.path.abspath(args.data)}"
    else:
        problem = make_ridge_problem(seed=args.seed)
        data = f"synthetic:seed={args.seed}"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} exists and is not a folder")
    run_config = {**config.to_dict(), "data": data}
    res = run_ridge(problem, config, out_dir=args.out, run_config=run_config, chunk_size=args.checkpoint_every,
                    progress=not args.no_progress)
    metrics = {k: res[k] for k in ("weight_decay", "val_loss", "val_loss_model", "weight_decay_closed_form",
                                   "val_loss_closed_form", "regret", "log10_ratio")}
    n_train, d = problem.X_train.shape
    write_results(args.out, run_config, metrics, wall_s=res["wall_s"], **metrics, schedule=res["schedule"],
                  problem={"n_train": n_train, "n_val": len(problem.y_val), "d": d},
                  resumed_from_step=res["resumed_from_step"])
    print(f"{args.method}: weight decay {res['weight_decay']:.4g} (closed form {res['weight_decay_closed_form']:.4g}),"
          f" regret {res['regret']:.2e} -> {os.path.join(args.out, 'results.json')}")
    return 0


# ---------------------------------------------------------------------------------------------
# The program

COMMANDS: dict[str, Command] = {
    "ridge": Command("tune ridge regression's weight decay (stn, delta-stn, unrolled) against the closed form",
                     _ridge_arguments, _ridge),
    "mlp": Command(mlp_cli.HELP, mlp_cli.add_arguments, mlp_cli.run),
    "schedule": Command(schedule_cli.HELP, schedule_cli.add_arguments, schedule_cli.run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stn_jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command].run(args)


def entry_point() -> None:
    sys.exit(run_main(main))
