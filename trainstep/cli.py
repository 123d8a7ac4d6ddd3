"""``python -m trainstep``: plain supervised training through the experiment runner.

Also provides :func:`run_main`, the error handling every command-line tool of the library shares:
bad input (data, configuration) prints one ``error:`` line and exits with code 2, a non-finite
loss exits with code 3, and neither prints a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Optional

from trainstep.data import DataError
from trainstep.runner import ConfigError, NonFiniteLossError

EXIT_BAD_INPUT = 2
EXIT_NON_FINITE = 3


def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Runs a CLI ``main`` and maps the library's errors to exit codes without tracebacks."""
    try:
        return int(main(argv) or 0)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    except KeyboardInterrupt:
        print("interrupted: run the same command again with the same --out to resume", file=sys.stderr)
        return 130


def _int_at_least(name, minimum: int):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {v}")
        return v
    return parse


def _positive_int(name):
    return _int_at_least(name, 1)


def _nonneg_int(name):
    return _int_at_least(name, 0)


def _float(name, *, positive=False, nonneg=False):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(v) or (positive and v <= 0) or (nonneg and v < 0):
            cond = "> 0" if positive else ">= 0" if nonneg else "finite"
            raise argparse.ArgumentTypeError(f"{name} must be finite and {cond}, got {text!r}")
        return v
    return parse


def train_config(dataset: str = "mnist1d", model: str = "mlp", steps: int = 6000, batch: int = 100,
                 lr: float = 1e-2, optimizer: str = "adam", l2: float = 0.0, seed: int = 0,
                 val_fraction: float = 0.1) -> dict:
    """The configuration of :func:`train_classifier` (also what ``run_config.json`` records)."""
    return dict(dataset=dataset, model=model, steps=steps, batch=batch, lr=lr, optimizer=optimizer,
                l2=l2, seed=seed, val_fraction=val_fraction)


def train_classifier(config: dict, out_dir: Optional[str], *, checkpoint_every: Optional[int] = None,
                     progress: bool = True, on_chunk=None) -> dict:
    """Plain supervised training of a linear model or MLP; writes ``out_dir/results.json``.

    The data are loaded and validated before anything is written to ``out_dir``.

    Returns:
      The results dictionary that was written.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from trainstep.core import gradient_step
    from trainstep.data import load_dataset, minibatch_fn
    from trainstep.models import classification_loss, evaluate_classifier, make_classifier
    from trainstep.runner import downsample_curve, run_chunked, write_results

    data = load_dataset(config["dataset"], val_fraction=config["val_fraction"])
    if config["batch"] > len(data.y_train):
        raise ConfigError(f"--batch {config['batch']} exceeds the {len(data.y_train)} training examples")
    optimizers = {"adam": optax.adam, "sgd": optax.sgd}
    if config["optimizer"] not in optimizers:
        raise ConfigError(f"unknown optimizer {config['optimizer']!r}: expected one of {sorted(optimizers)}")
    try:
        model = make_classifier(config["model"], data.num_classes)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    make_tx = optimizers[config["optimizer"]]
    ts = gradient_step(classification_loss(model.apply), lambda h: make_tx(h["learning_rate"]))
    hparams = {"learning_rate": jnp.asarray(config["lr"], jnp.float32), "l2": jnp.asarray(config["l2"], jnp.float32)}
    init_key, train_key, shuffle_key = jax.random.split(jax.random.key(config["seed"]), 3)
    params = model.init(init_key, jnp.zeros((1, data.num_features), jnp.float32))
    state = ts.init(params, hparams)
    batch_fn = minibatch_fn((data.x_train, data.y_train), config["batch"], mode="epoch", key=shuffle_key,
                            num_steps=config["steps"])

    run = run_chunked(ts, state, hparams, key=train_key, num_steps=config["steps"], batch_fn=batch_fn,
                      out_dir=out_dir, config=config, chunk_size=checkpoint_every,
                      desc=f"{config['dataset']}/{config['model']}/seed{config['seed']}",
                      progress=progress, on_chunk=on_chunk)
    evaluate = jax.jit(lambda p, x, y: evaluate_classifier(model.apply, p, x, y))
    metrics = {}
    for split in ("train", "val", "test"):
        if len(getattr(data, f"y_{split}")) == 0:
            continue
        ev = evaluate(run.state.params, getattr(data, f"x_{split}"), getattr(data, f"y_{split}"))
        metrics[f"{split}_loss"] = float(ev["loss"])
        metrics[f"{split}_accuracy"] = float(ev["accuracy"])
    curves = {k: downsample_curve(v) for k, v in run.history.items() if np.ndim(v) == 1}
    if out_dir is None:
        return {"config": config, "metrics": metrics, "wall_s": run.wall_s, "curves": curves}
    return write_results(out_dir, config, metrics, wall_s=run.wall_s, data=data.summary(), curves=curves,
                         resumed_from_step=run.resumed_from)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainstep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="plain supervised training, writes DIR/results.json with test accuracy")
    p.add_argument("--dataset", default="mnist1d", help="mnist1d | digits | npz:PATH (default mnist1d)")
    p.add_argument("--model", default="mlp", choices=["linear", "mlp"])
    p.add_argument("--steps", type=_positive_int("--steps"), default=6000)
    p.add_argument("--batch", type=_positive_int("--batch"), default=100)
    p.add_argument("--lr", type=_float("--lr", positive=True), default=1e-2)
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--l2", type=_float("--l2", nonneg=True), default=0.0, help="L2 penalty l2/2 |w|^2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=_float("--val-fraction", nonneg=True), default=0.1,
                   help="part of the training split held out for validation; 0 trains on all of it")
    p.add_argument("--out", required=True, help="output folder (results.json, checkpoints/)")
    p.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"), default=None,
                   help="steps per chunk and checkpoint (default: steps/20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        if not args.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
        config = train_config(dataset=args.dataset, model=args.model, steps=args.steps, batch=args.batch,
                              lr=args.lr, optimizer=args.optimizer, l2=args.l2, seed=args.seed,
                              val_fraction=args.val_fraction)
        results = train_classifier(config, args.out, checkpoint_every=args.checkpoint_every,
                                   progress=not args.no_progress)
        m = results["metrics"]
        print(f"test accuracy {m['test_accuracy']:.4f} -> {os.path.join(args.out, 'results.json')}")
    return 0


def entry_point() -> None:
    sys.exit(run_main(main))
