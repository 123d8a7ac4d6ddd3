"""``python -m stn_jax mlp``: STN, Delta-STN and the search baselines on an MLP, in one harness.

::

    python -m stn_jax mlp --dataset mnist1d|digits --seeds N --budget B --out DIR \\
        [--steps T --lr LR --methods stn,stn-frozen,delta-stn,random,grid,optuna,fixed --no-progress ...]

The MLP (:mod:`stn_jax.mlp`) has six regularisation hyperparameters: input dropout, two hidden
dropouts, Gaussian input noise, weight decay and the magnitude of a random-shift augmentation.
Every method sees the same data split and trains for ``--steps`` weight steps per run; the searches
(:mod:`stn_jax.baselines`) get ``--budget`` trials and select by validation loss.

Writes ``DIR/results.json``::

    {"config": ..., "data": {...}, "metrics": {"target": ...},
     "methods": {name: {"val_loss", "test_loss", "test_accuracy", "cost_runs", "wall_s",
                        "<metric>_std", ..., "per_seed": [...]}}}

(means over seeds, ``_std`` the sample standard deviations), ``DIR/cost.png`` (best-so-far
validation loss against cost in plain-run units) and ``DIR/schedules.png`` (STN's and
Delta-STN's hyperparameters against the weight step).

Bad input exits with code 2 and one ``error:`` line, writing nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from trainstep.runner import ConfigError

DATASETS = ("mnist1d", "digits")
# The target: STN at least as accurate as the best of random search (10 trials) and grid
# search, at a cost of at most 2.5 plain runs.
TARGET_COST_RUNS = 2.5
TARGET_BUDGET = 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    from stn_jax.baselines import METHODS
    from stn_jax.mlp import MLPSetup

    # Numbers are parsed in mlp_config, so that every bad value gives one "error:" line (exit 2).
    p.add_argument("--dataset", default="mnist1d", help=f"one of {', '.join(DATASETS)} (default mnist1d)")
    p.add_argument("--seeds", default="3", help="seeds 0 .. N-1, each a full comparison (default 3)")
    p.add_argument("--budget", default=str(TARGET_BUDGET), help="trials of each search (default 10)")
    p.add_argument("--steps", default=None, help=f"weight steps of every run (default {MLPSetup.steps})")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list (default {','.join(METHODS)})")
    p.add_argument("--out", required=True, help="output folder (results.json, cost.png, schedules.png)")
    p.add_argument("--lr", default=str(MLPSetup.lr),
                   help=f"Adam step size of every weight step, plain and STN (default {MLPSetup.lr:g})")
    p.add_argument("--hidden", default=",".join(map(str, MLPSetup.hidden)), help="hidden widths (default 100,100)")
    p.add_argument("--stn-warmup", default=None, help="STN weight steps before tuning starts (default steps/12)")
    p.add_argument("--hyper-lr", default="3e-3", help="STN's Adam step size on the hyperparameters")
    p.add_argument("--entropy-weight", default="1e-3", help="STN's weight of the perturbation entropy")
    p.add_argument("--t-train", default="5", help="STN weight steps per hyper step")
    p.add_argument("--optuna-batch", default=None, help="optuna trials asked per vmapped batch (default budget/3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _number(text, name: str, kind=int, minimum=None, strict=False):
    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(v):
        raise ConfigError(f"--{name} must be finite, got {text!r}")
    if minimum is not None and (v <= minimum if strict else v < minimum):
        raise ConfigError(f"--{name} must be {'>' if strict else '>='} {minimum}, got {text!r}")
    return v


def mlp_config(args: argparse.Namespace) -> dict:
    """The validated configuration of a run (raises :class:`ConfigError` on bad input)."""
    from stn_jax.baselines import METHODS
    from stn_jax.mlp import MLPSetup

    if args.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {args.dataset!r}: choose from {', '.join(DATASETS)}")
    methods = [m.strip() for m in str(args.methods).split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown methods {unknown or [args.methods]}: choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {args.methods}")
    steps = MLPSetup.steps if args.steps is None else _number(args.steps, "steps", minimum=2)
    try:
        hidden = [int(h) for h in str(args.hidden).split(",")]
    except ValueError:
        raise ConfigError(f"--hidden must be comma-separated integers, got {args.hidden!r}") from None
    if not hidden or min(hidden) < 1:
        raise ConfigError(f"--hidden needs widths >= 1, got {args.hidden!r}")
    warmup = steps // 12 if args.stn_warmup is None else _number(args.stn_warmup, "stn-warmup", minimum=0)
    t_train = _number(args.t_train, "t-train", minimum=1)
    if not (warmup < steps and (steps - warmup) // t_train >= 1):
        raise ConfigError(f"--stn-warmup {warmup} leaves no STN cycle of --t-train {t_train} in --steps {steps}")
    budget = _number(args.budget, "budget", minimum=1)
    config = {
        "dataset": args.dataset, "seeds": _number(args.seeds, "seeds", minimum=1), "budget": budget,
        "steps": steps, "methods": methods, "hidden": hidden,
        "lr": _number(args.lr, "lr", float, 0.0, strict=True),
        "stn": {"warmup": warmup, "t_train": t_train,
                "hyper_lr": _number(args.hyper_lr, "hyper-lr", float, 0.0, strict=True),
                "entropy_weight": _number(args.entropy_weight, "entropy-weight", float, 0.0)},
        "optuna_batch": (math.ceil(budget / 3) if args.optuna_batch is None
                         else _number(args.optuna_batch, "optuna-batch", minimum=1)),
    }
    if "optuna" in methods:
        from stn_jax.baselines import _import_optuna

        _import_optuna()
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ConfigError(f"--out {args.out} exists and is not a folder")
    return config


def target_check(methods: dict, budget: int) -> dict:
    """Whether STN meets the issue's target against the searches that ran (means over seeds)."""
    searches = [m for m in ("random", "grid") if m in methods]
    if "stn" not in methods or not searches:
        return {"evaluated": False, "why": "needs stn and at least one of random, grid"}
    best = max(searches, key=lambda m: methods[m]["test_accuracy"])
    stn = methods["stn"]
    acc_ok = stn["test_accuracy"] >= methods[best]["test_accuracy"]
    cost_ok = stn["cost_runs"] <= TARGET_COST_RUNS
    return {"evaluated": True, "budget": budget, "budget_is_target": budget == TARGET_BUDGET,
            "stn_test_accuracy": stn["test_accuracy"], "best_search": best,
            "best_search_test_accuracy": methods[best]["test_accuracy"], "accuracy_holds": bool(acc_ok),
            "stn_cost_runs": stn["cost_runs"], "stn_cost_runs_compute": stn.get("cost_runs_compute"),
            "cost_limit_runs": TARGET_COST_RUNS, "cost_holds": bool(cost_ok), "holds": bool(acc_ok and cost_ok)}


def run_mlp(config: dict, out_dir: str, *, progress: bool = False, log=None) -> dict:
    """Runs the comparison of a validated :func:`mlp_config` and writes ``out_dir``; returns the
    results written."""
    import time

    from stn_jax.baselines import compare
    from stn_jax.mlp import MLPSetup, load_data
    from trainstep.runner import write_results

    setup = MLPSetup(dataset=config["dataset"], hidden=tuple(config["hidden"]), steps=config["steps"],
                     lr=config.get("lr", MLPSetup.lr))
    data = load_data(setup)
    start = time.perf_counter()
    methods = compare(setup, data, methods=config["methods"], seeds=config["seeds"], budget=config["budget"],
                      stn_options=config["stn"], optuna_batch=config["optuna_batch"], progress=progress, log=log)
    summary = {"dataset": data.name, "n_train": len(data.y_train), "n_val": len(data.y_val),
               "n_test": len(data.y_test), "num_features": data.num_features, "num_classes": data.num_classes,
               "split": f"validation = {setup.val_fraction:g} of the training split (stratified, split seed 0), "
                        "the same for every method and seed"}
    run_config = {**config, "batch": setup.batch, "lr": setup.lr, "val_fraction": setup.val_fraction}
    results = write_results(out_dir, run_config, {"target": target_check(methods, config["budget"])},
                            wall_s=time.perf_counter() - start, data=summary, methods=methods)
    plot_cost(results, os.path.join(out_dir, "cost.png"))
    plot_schedules(results, os.path.join(out_dir, "schedules.png"))
    return results


# ---------------------------------------------------------------------------------------------
# Plots

COLORS = {"stn": "C3", "stn-frozen": "C5", "delta-stn": "C1", "random": "C0", "grid": "C2", "optuna": "C4",
          "fixed": "k"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cost(results: dict, path: str) -> None:
    """Best-so-far validation loss against cost (plain runs), and test accuracy against cost."""
    import numpy as np

    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    for name, m in results["methods"].items():
        c = COLORS.get(name, None)
        if "trials" in m["per_seed"][0]:
            curves = np.asarray([r["best_so_far"] for r in m["per_seed"]], np.float64)
            cost = np.arange(1, curves.shape[1] + 1)
            mean, std = curves.mean(0), curves.std(0)
            ax.step(cost, mean, where="post", color=c, label=name)
            ax.fill_between(cost, mean - std, mean + std, step="post", color=c, alpha=0.15)
        else:
            ax.errorbar([m["cost_runs"]], [m["val_loss"]], xerr=[m["cost_runs_std"]], yerr=[m["val_loss_std"]],
                        fmt="o" if name != "fixed" else "s", color=c, label=name, capsize=3)
        ax2.errorbar([m["cost_runs"]], [100 * m["test_accuracy"]], xerr=[m["cost_runs_std"]],
                     yerr=[100 * m["test_accuracy_std"]], fmt="o", color=c, label=name, capsize=3)
    ax.set_xlabel("cost (plain training runs)")
    ax.set_ylabel("best validation loss so far")
    ax.set_xscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax2.set_xlabel("cost (plain training runs)")
    ax2.set_ylabel("test accuracy of the selected model (%)")
    ax2.set_xscale("log")
    ax2.grid(alpha=0.3, which="both")
    n = results["config"]["seeds"]
    fig.suptitle(f"{results['data']['dataset']}: mean ± std over {n} seed{'s' if n > 1 else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_schedules(results: dict, path: str) -> None:
    """STN's and Delta-STN's hyperparameters against the weight step, one line per seed."""
    from stn_jax.mlp import mlp_space

    tuned = [m for m in ("stn", "delta-stn") if m in results["methods"]]
    if not tuned:
        return
    plt = _pyplot()
    names = mlp_space().names
    fig, axes = plt.subplots(2, 3, figsize=(11.0, 5.6))
    for ax, name in zip(axes.ravel(), names, strict=True):
        for method in tuned:
            for i, r in enumerate(results["methods"][method]["per_seed"]):
                s = r["schedule"]
                ax.plot(s["step"], s[name], color=COLORS[method], lw=1.0, alpha=0.8,
                        ls="-" if method == "stn" else "--", label=method if i == 0 else None)
        if name in ("input_noise", "weight_decay"):
            ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("weight step", fontsize=8)
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The command


def run(args: argparse.Namespace) -> int:
    config = mlp_config(args)  # everything that can be wrong with the input, before anything is written

    def log(line):
        print(line, file=sys.stderr, flush=True)

    results = run_mlp(config, args.out, progress=not args.no_progress, log=log)
    for name, m in results["methods"].items():
        print(f"{name:>9}: test acc {100 * m['test_accuracy']:.1f} ± {100 * m['test_accuracy_std']:.1f} %, "
              f"val loss {m['val_loss']:.4f}, cost {m['cost_runs']:.2f} runs, wall {m['wall_s']:.1f} s")
    print(f"-> {os.path.join(args.out, 'results.json')}")
    return 0


# The parts of the ``mlp`` :class:`stn_jax.cli.Command` (help, add_arguments, run).
HELP = ("tune an MLP's six regularisers: STN and Delta-STN against fixed, grid, random and optuna search "
        "in one harness")

