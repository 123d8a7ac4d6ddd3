"""``python -m meta_rules``: meta-train an unsupervised update rule, and evaluate one on a dataset.

::

    python -m meta_rules meta-train --out DIR [--estimator tbptt|es|pes --steps N --tasks B ...]
    python -m meta_rules evaluate --rule DIR (--data F.npz | --dataset mnist1d|digits) \\
        --activation relu|step|tanh --width W --depth D --shots 10 [50] --steps N --out DIR2

``meta-train`` runs through the experiment runner (orbax checkpoints in ``DIR/checkpoints``: the same
command resumes) and writes ``DIR/theta.npz`` (:func:`meta_rules.save_theta`), ``DIR/results.json`` (the
configuration, the meta-loss curve, first and last meta-loss) and ``DIR/meta_loss.png``.

``evaluate`` writes ``DIR2/results.json`` with few-shot accuracy (ridge and logistic readouts, mean ± std
over seeds × episodes) of the learned rule after ``N`` steps, the random initialisation, an autoencoder
trained with Adam for the same ``N`` steps, PCA and the raw input (see :mod:`meta_rules.evaluate`).
``F.npz`` holds ``X`` ``(n, d)`` and integer labels ``y`` ``(n,)``.

Bad input exits with code 2 and one ``error:`` line, writing nothing; a non-finite meta-loss with code 3.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Optional

from trainstep.cli import _float, _nonneg_int, _positive_int, run_main
from trainstep.runner import ConfigError

THETA_FILE = "theta.npz"


# ---------------------------------------------------------------------------------------------
# meta-train


def meta_train_config(estimator: str = "tbptt", steps: int = 400, tasks: int = 8, lr: float = 3e-3,
                      clip: float = 1.0, sigma: float = 0.01, width: int = 32, depth: int = 2,
                      activation: str = "relu", hidden: int = 16, channels: int = 4, max_step: float = 0.1,
                      decay_steps: float = 50.0, batch: int = 32, trunc_min: int = 10, trunc_max: int = 10,
                      len_min: int = 50, len_max: int = 150, num_classes: int = 10, shots: int = 10,
                      clustered_weight: float = 0.3, seed: int = 0) -> dict:
    """The configuration of :func:`run_meta_train` (also what ``run_config.json`` records).

    The defaults are the CPU-scale run (a few minutes on two cores).
    """
    return dict(estimator=estimator, steps=steps, tasks=tasks, lr=lr, clip=clip, sigma=sigma, width=width,
                depth=depth, activation=activation, hidden=hidden, channels=channels, max_step=max_step,
                decay_steps=decay_steps, batch=batch, trunc_min=trunc_min, trunc_max=trunc_max, len_min=len_min,
                len_max=len_max,
                num_classes=num_classes, shots=shots, clustered_weight=clustered_weight, seed=seed)


def meta_run_keys(seed: int):
    """``(k_theta, k_episodes, k_steps)`` of a meta-training run: ``jax.random.split(key(seed), 3)``.

    θ's initialisation, the initial inner episodes and the meta-steps' randomness all derive from
    ``seed`` alone; no seed is special.
    """
    import jax

    return tuple(jax.random.split(jax.random.key(seed), 3))


def build_meta_training(config: dict):
    """``(meta_step, state, rule_config, unroll_config)`` for ``config``, validated (nothing written)."""

    from meta_rules.estimators import ESTIMATORS, make_estimator
    from meta_rules.meta_train import make_meta_train_step, meta_optimizer
    from meta_rules.objective import UnrollConfig, make_meta_unroll
    from meta_rules.rule import RuleConfig, init_theta
    from meta_rules.tasks import TaskConfig, meta_train_task_fn

    if config["estimator"] not in ESTIMATORS:
        raise ConfigError(f"unknown estimator {config['estimator']!r}: expected one of {list(ESTIMATORS)}")
    if not 0.0 <= config["clustered_weight"] <= 1.0:
        raise ConfigError(f"--clustered-weight must be in [0, 1], got {config['clustered_weight']}")
    rule_config = RuleConfig(hidden=config["hidden"], channels=config["channels"], max_step=config["max_step"],
                             decay_steps=config["decay_steps"])
    task_config = TaskConfig(num_classes=config["num_classes"], shots=config["shots"], queries=10, unlabelled=32)
    unroll_config = UnrollConfig(sizes=(64,) + (config["width"],) * config["depth"], activation=config["activation"],
                                 batch_size=config["batch"], truncation=(config["trunc_min"], config["trunc_max"]),
                                 length=(config["len_min"], config["len_max"]))
    unroller = make_meta_unroll(meta_train_task_fn(task_config, clustered_weight=config["clustered_weight"]),
                                config["num_classes"], unroll_config, rule_config)
    estimator = make_estimator(unroller, config["estimator"], sigma=config["sigma"])
    meta_step = make_meta_train_step(estimator, meta_optimizer(config["lr"], config["clip"]))
    k_theta, k_states, _ = meta_run_keys(config["seed"])
    state = meta_step.init(init_theta(k_theta, rule_config), k_states, config["tasks"])
    return meta_step, state, rule_config, unroll_config


def plot_meta_loss(path: str, curve: dict, title: str) -> None:
    """The meta-loss curve (window means) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(curve["step"], curve["value"])
    ax.set_xlabel("meta-step")
    ax.set_ylabel("meta-loss (cosine ridge readout)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_meta_train(config: dict, out_dir: str, *, checkpoint_every: Optional[int] = None,
                   progress: bool = True) -> dict:
    """Meta-trains a rule through the runner; writes ``theta.npz``, ``results.json``, ``meta_loss.png``.

    Returns:
      The results dictionary written.
    """
    import numpy as np

    from meta_rules.io import save_theta
    from trainstep.runner import downsample_curve, run_chunked, write_results

    meta_step, state, rule_config, unroll_config = build_meta_training(config)
    run = run_chunked(meta_step, state, None, key=meta_run_keys(config["seed"])[2],
                      num_steps=config["steps"], batch_fn=lambda k, t: None, out_dir=out_dir, config=config,
                      chunk_size=checkpoint_every, desc=f"meta-train/{config['estimator']}", progress=progress)
    loss = np.asarray(run.history["loss"], np.float64)
    tenth = max(1, len(loss) // 10)
    metrics = {"meta_loss_first": float(loss[:tenth].mean()), "meta_loss_last": float(loss[-tenth:].mean()),
               "grad_norm_last": float(np.mean(run.history["grad_norm"][-tenth:]))}
    from meta_rules.rule import step_sizes

    sizes = np.asarray(step_sizes(run.state.theta, rule_config))
    metrics.update(step_size_w=float(sizes[0]), step_size_v=float(sizes[1]), step_size_b=float(sizes[2]))
    metadata = {"sizes": list(unroll_config.sizes), "activation": unroll_config.activation,
                "batch_size": unroll_config.batch_size, "normalize": unroll_config.normalize,
                "meta_train_config": config}
    save_theta(os.path.join(out_dir, THETA_FILE), run.state.theta, rule_config, metadata=metadata)
    curves = {k: downsample_curve(v) for k, v in run.history.items() if np.ndim(v) == 1}
    plot_meta_loss(os.path.join(out_dir, "meta_loss.png"), curves["loss"],
                   f"{config['estimator']}, {config['tasks']} tasks/step, lr {config['lr']}")
    return write_results(out_dir, config, metrics, wall_s=run.wall_s, curves=curves,
                         resumed_from_step=run.resumed_from, rule_config=rule_config.__dict__)


def _meta_train_arguments(p: argparse.ArgumentParser) -> None:
    from meta_rules.estimators import ESTIMATORS

    d = meta_train_config()
    p.add_argument("--out", required=True, help="output folder (theta.npz, results.json, meta_loss.png, checkpoints/)")
    p.add_argument("--estimator", choices=ESTIMATORS, default=d["estimator"], help="meta-gradient estimator")
    p.add_argument("--steps", type=_positive_int("--steps"), default=d["steps"], help="meta-steps")
    p.add_argument("--tasks", type=_positive_int("--tasks"), default=d["tasks"], help="vmapped tasks per meta-step")
    p.add_argument("--lr", type=_float("--lr", positive=True), default=d["lr"], help="outer Adam learning rate")
    p.add_argument("--clip", type=_float("--clip", positive=True), default=d["clip"], help="global-norm clip")
    p.add_argument("--sigma", type=_float("--sigma", positive=True), default=d["sigma"], help="ES/PES perturbation")
    p.add_argument("--width", type=_positive_int("--width"), default=d["width"], help="base MLP hidden width")
    p.add_argument("--depth", type=_positive_int("--depth"), default=d["depth"], help="base MLP hidden layers")
    p.add_argument("--activation", choices=["relu", "leaky_relu", "tanh", "step"], default=d["activation"])
    p.add_argument("--hidden", type=_positive_int("--hidden"), default=d["hidden"], help="rule network width")
    p.add_argument("--channels", type=_positive_int("--channels"), default=d["channels"])
    p.add_argument("--max-step", type=_float("--max-step", positive=True), default=d["max_step"])
    p.add_argument("--decay-steps", type=_float("--decay-steps", nonneg=True), default=d["decay_steps"],
                   help="harmonic step-size schedule 1/(1 + t/decay_steps) of the rule; 0: constant")
    p.add_argument("--batch", type=_positive_int("--batch"), default=d["batch"], help="unlabelled batch per inner step")
    p.add_argument("--trunc-min", type=_positive_int("--trunc-min"), default=d["trunc_min"])
    p.add_argument("--trunc-max", type=_positive_int("--trunc-max"), default=d["trunc_max"])
    p.add_argument("--len-min", type=_positive_int("--len-min"), default=d["len_min"], help="episode length range")
    p.add_argument("--len-max", type=_positive_int("--len-max"), default=d["len_max"])
    p.add_argument("--num-classes", type=_positive_int("--num-classes"), default=d["num_classes"])
    p.add_argument("--shots", type=_positive_int("--shots"), default=d["shots"], help="support examples per class")
    p.add_argument("--clustered-weight", type=_float("--clustered-weight", nonneg=True),
                   default=d["clustered_weight"], help="fraction of synthetic clustered tasks")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"), default=None,
                   help="meta-steps per chunk and checkpoint (default: steps/20)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _meta_train(args: argparse.Namespace) -> int:
    keys = meta_train_config().keys()
    config = meta_train_config(**{k: getattr(args, k) for k in keys})
    results = run_meta_train(config, args.out, checkpoint_every=args.checkpoint_every,
                             progress=not args.no_progress)
    m = results["metrics"]
    print(f"meta-loss {m['meta_loss_first']:.4f} -> {m['meta_loss_last']:.4f}; "
          f"θ -> {os.path.join(args.out, THETA_FILE)}")
    return 0


# ---------------------------------------------------------------------------------------------
# evaluate


def load_rule(path: str):
    """``(theta, rule_config, metadata)`` from a meta-train folder or a ``theta.npz`` file."""
    from meta_rules.io import load_theta
    from trainstep.data import DataError

    file = os.path.join(path, THETA_FILE) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise DataError(f"{path}: no meta-trained rule there (expected {THETA_FILE} from `meta-train`)")
    return load_theta(file)


def load_eval_data(data: Optional[str], dataset: Optional[str]):
    """``(x, y, source)``: an ``.npz`` with keys ``X`` and ``y``, or a named dataset (all of its examples)."""
    import numpy as np

    if data is not None:
        from trainstep.data import load_npz

        arrays = load_npz(data, ["X", "y"])
        return arrays["X"], arrays["y"], data
    if dataset == "mnist1d":
        from trainstep.data import load_mnist1d

        d = load_mnist1d(val_fraction=0.0)
    elif dataset == "digits":
        from trainstep.data import load_digits

        d = load_digits(val_fraction=0.0, test_fraction=0.2)
    else:
        raise ConfigError(f"unknown dataset {dataset!r}: expected mnist1d or digits")
    return np.concatenate([d.x_train, d.x_test]), np.concatenate([d.y_train, d.y_test]), dataset


def run_evaluate(args: argparse.Namespace) -> dict:
    """Validates everything, evaluates, then writes ``results.json`` (see the module docstring)."""
    import jax

    from meta_rules.evaluate import FewShotConfig, evaluate_methods
    from trainstep.runner import write_results

    theta, rule_config, metadata = load_rule(args.rule)
    x, y, source = load_eval_data(args.data, args.dataset)
    config = FewShotConfig(shots=tuple(args.shots), queries=args.queries, episodes=args.episodes, seeds=args.seeds,
                           batch_size=args.batch or int(metadata.get("batch_size", 32)))
    start = time.perf_counter()
    results = evaluate_methods(theta, rule_config, x, y, hidden=(args.width,) * args.depth,
                               activation=args.activation, steps=args.steps, curve_steps=tuple(args.curve_steps),
                               config=config, key=jax.random.key(args.seed), source=source)
    wall = time.perf_counter() - start
    run_config = {k: getattr(args, k) for k in ("rule", "data", "dataset", "activation", "width", "depth", "shots",
                                                "steps", "curve_steps", "seeds", "episodes", "queries", "seed")}
    os.makedirs(args.out, exist_ok=True)
    return write_results(args.out, run_config, results["methods"], wall_s=wall, curves=results["curves"],
                         data=results["data"], setup=results["setup"], rule_metadata=metadata)


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule", required=True, help="a meta-train output folder (or its theta.npz)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="an .npz file with X (n, d) and integer labels y (n,)")
    src.add_argument("--dataset", choices=["mnist1d", "digits"], help="a built-in dataset (all its examples)")
    p.add_argument("--activation", choices=["relu", "leaky_relu", "tanh", "step"], default="relu")
    p.add_argument("--width", type=_positive_int("--width"), default=32, help="hidden width of the base MLP")
    p.add_argument("--depth", type=_positive_int("--depth"), default=2, help="hidden layers of the base MLP")
    p.add_argument("--shots", type=_positive_int("--shots"), nargs="+", default=[10, 50],
                   help="labelled examples per class (one evaluation each; default 10 50)")
    p.add_argument("--steps", type=_nonneg_int("--steps"), default=100,
                   help="inner steps of the rule and of the autoencoder")
    p.add_argument("--curve-steps", type=_nonneg_int("--curve-steps"), nargs="*", default=[],
                   help="extra step counts for an accuracy-against-steps curve (ridge readout)")
    p.add_argument("--seeds", type=_positive_int("--seeds"), default=10, help="base-network initialisations")
    p.add_argument("--episodes", type=_positive_int("--episodes"), default=30, help="episodes per seed")
    p.add_argument("--queries", type=_positive_int("--queries"), default=20, help="query examples per class")
    p.add_argument("--batch", type=_positive_int("--batch"), default=None,
                   help="minibatch of the rule and autoencoder (default: the meta-training batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (results.json)")


def _evaluate(args: argparse.Namespace) -> int:
    results = run_evaluate(args)
    for method, per in results["metrics"].items():
        cells = ", ".join(f"{r} {s}-shot {v['mean']:.3f}±{v['std']:.3f}" for r, by in per.items()
                          for s, v in by.items())
        print(f"{method:12s} {cells}")
    print(f"-> {os.path.join(args.out, 'results.json')}")
    return 0


COMMANDS = {
    "meta-train": ("meta-train a rule, write theta.npz, results.json, meta_loss.png", _meta_train_arguments,
                   _meta_train),
    "evaluate": ("few-shot accuracy of a rule against random init, autoencoder, PCA, raw input",
                 _evaluate_arguments, _evaluate),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m meta_rules", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command][2](args)


def entry_point() -> None:
    sys.exit(run_main(main))
