"""``python -m comm_sgd``: local SGD on logistic regression (``logreg``) and on an MLP (``mlp``).

``logreg`` is the contract::

    python -m comm_sgd logreg (--data F.npz | --synthetic n,d,scale) --l2 L --workers K --steps T \\
        --batch b --schedule SPEC --lr stich|poly:c:alpha|const:c --average last|uniform|stich \\
        --seeds S --out DIR [--backend vmap|mesh] [--coordinator HOST:PORT --num-processes N --process-id I]

It writes ``DIR/results.json`` (``communications``, ``suboptimality`` = mean over seeds of
``f(w_out) - f*``, ``final_loss``, per-seed values) and ``DIR/params.npz`` (``w``, shape (S, d)).
With ``--coordinator`` the same command, started once per process, joins a multi-process run
(``jax.distributed``; gloo collectives on CPU) and only process 0 writes.

Bad input exits with code 2 and one ``error:`` line; a non-finite loss with code 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Optional

import numpy as np

from trainstep.cli import _float, _positive_int, run_main
from trainstep.runner import ConfigError


def _synthetic(text: str):
    parts = text.split(",")
    try:
        if len(parts) != 3:
            raise ValueError
        n, d, scale = int(parts[0]), int(parts[1]), float(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"--synthetic must be n,d,scale (e.g. 4096,20,3), got {text!r}") from None
    if n < 2 or d < 1 or not np.isfinite(scale) or scale <= 0:
        raise argparse.ArgumentTypeError(f"--synthetic needs n >= 2, d >= 1, scale > 0, got {text!r}")
    return n, d, scale


def _add_common(p: argparse.ArgumentParser, *, workers: int, steps: int, batch: int, seeds: int) -> None:
    p.add_argument("--workers", type=_positive_int("--workers"), default=workers, help="K, the number of workers")
    p.add_argument("--steps", type=_positive_int("--steps"), default=steps, help="T, local steps per worker")
    p.add_argument("--batch", type=_positive_int("--batch"), default=batch, help="b, minibatch per worker and step")
    p.add_argument("--seeds", type=_positive_int("--seeds"), default=seeds, help="independent runs (vectorised)")
    p.add_argument("--seed", type=int, default=0, help="base random seed")
    p.add_argument("--sampling", choices=["iid", "shards"], default="iid",
                   help="iid: every worker samples the whole data; shards: each its own label-sorted block")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"), default=None,
                   help="steps per chunk and checkpoint (default: steps/20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comm_sgd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("logreg", help="local SGD on L2-regularised logistic regression, suboptimality vs f*")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="an .npz file with X (n, d) float and y (n,) in {-1, +1}")
    src.add_argument("--synthetic", type=_synthetic, help="n,d,scale: a synthetic problem")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic problem")
    p.add_argument("--l2", type=_float("--l2", positive=True), default=1e-2, help="L in (L/2)|w|^2 (default 0.01)")
    _add_common(p, workers=4, steps=2000, batch=1, seeds=1)
    p.add_argument("--schedule", default="every",
                   help="every | fixed:H | post-local:W:H | increasing:c[:p] | once | steps:s1,s2,...")
    p.add_argument("--lr", default="stich", help="stich (4/(mu(a+t))) | poly:c:alpha (c (t+1)^-alpha) | const:c")
    p.add_argument("--average", choices=["last", "uniform", "stich"], default="stich", help="output iterate")
    p.add_argument("--backend", choices=["vmap", "mesh"], default="vmap",
                   help="vmap: simulate the workers on one device; mesh: shard_map over all devices")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0, for a multi-process run")
    p.add_argument("--num-processes", type=_positive_int("--num-processes"), default=1)
    p.add_argument("--process-id", type=int, default=0)

    m = sub.add_parser("mlp", help="local SGD of an MLP on MNIST-1D: test accuracy against communications")
    _add_common(m, workers=8, steps=3000, batch=16, seeds=3)
    m.add_argument("--schedules", default="every,post-local:500:16,increasing:1,fixed:4,fixed:16,fixed:64,once",
                   help="comma-separated list of schedules (a spec with commas, steps:..., is not allowed here)")
    m.add_argument("--lr", type=_float("--lr", positive=True), default=0.1, help="SGD step size")
    m.add_argument("--momentum", type=_float("--momentum", nonneg=True), default=0.9)
    m.add_argument("--hidden", default="100,100", help="hidden widths, comma-separated")
    m.add_argument("--dataset", default="mnist1d", help="mnist1d | digits | npz:PATH")
    return parser


def _logreg(args) -> int:
    from comm_sgd.parallel import initialize_distributed

    if args.coordinator is not None:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    elif args.num_processes != 1 or args.process_id != 0:
        raise ConfigError("--num-processes/--process-id need --coordinator HOST:PORT")

    import jax

    from comm_sgd.logreg import LogregConfig, load_problem, run_logreg, synthetic_problem
    from comm_sgd.parallel import worker_mesh
    from comm_sgd.schedules import parse_schedule
    from comm_sgd.step_sizes import parse_step_size
    from trainstep.runner import write_results

    # Everything that can be wrong with the input is checked before anything is written.
    parse_schedule(args.schedule)
    parse_step_size(args.lr, mu=1.0, a=1.0)
    if args.data is not None:
        problem = load_problem(args.data, args.l2)
    else:
        n, d, scale = args.synthetic
        problem = synthetic_problem(n, d, scale, args.l2, seed=args.data_seed)
    config = LogregConfig(workers=args.workers, steps=args.steps, batch=args.batch, schedule=args.schedule,
                          lr=args.lr, average=args.average, seeds=args.seeds, sampling=args.sampling,
                          seed=args.seed)
    config.validate()
    mesh = worker_mesh(args.workers) if args.backend == "mesh" else None
    if args.num_processes > 1 and mesh is None:
        raise ConfigError("a multi-process run needs --backend mesh")
    run_config = {**dataclasses.asdict(config), "data": problem.name, "l2": args.l2, "backend": args.backend,
                  "num_processes": args.num_processes}
    writer = jax.process_index() == 0
    res = run_logreg(problem, config, mesh=mesh, out_dir=args.out, run_config=run_config,
                     chunk_size=args.checkpoint_every, progress=not args.no_progress and writer,
                     desc=f"K={args.workers} {args.schedule}")
    if writer:
        metrics = {k: res[k] for k in ("communications", "bytes_all_reduced", "suboptimality", "final_loss",
                                       "f_star", "suboptimality_per_seed", "final_loss_per_seed")}
        extra = {"shift_a": res["shift_a"], "condition_number": res["condition_number"],
                 "num_devices": jax.device_count(), "num_processes": jax.process_count()}
        write_results(args.out, run_config, metrics, wall_s=res["wall_s"], **metrics, **extra)
        tmp = os.path.join(args.out, "params.tmp.npz")
        np.savez(tmp, w=res["w"])
        os.replace(tmp, os.path.join(args.out, "params.npz"))
        print(f"suboptimality {res['suboptimality']:.4e} with {res['communications']} communications "
              f"-> {os.path.join(args.out, 'results.json')}")
    return 0


def _mlp(args) -> int:
    from comm_sgd.mlp import MLPConfig, run_mlp_sweep

    schedules = [s.strip() for s in args.schedules.split(",") if s.strip()]
    try:
        hidden = tuple(int(h) for h in args.hidden.split(","))
    except ValueError:
        raise ConfigError(f"--hidden must be comma-separated integers, got {args.hidden!r}") from None
    config = MLPConfig(dataset=args.dataset, workers=args.workers, steps=args.steps, batch=args.batch,
                       lr=args.lr, momentum=args.momentum, hidden=hidden, seeds=args.seeds, seed=args.seed,
                       sampling=args.sampling)
    results = run_mlp_sweep(config, schedules, out_dir=args.out, progress=not args.no_progress,
                            checkpoint_every=args.checkpoint_every)
    for name, r in results["schedules"].items():
        print(f"{name:>24s}: {r['communications']:5d} communications, test accuracy "
              f"{r['test_accuracy']:.4f} ± {r['test_accuracy_std']:.4f}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "logreg":
        return _logreg(args)
    return _mlp(args)


def entry_point() -> None:
    sys.exit(run_main(main))
