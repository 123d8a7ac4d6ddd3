"""Local SGD beyond the convex case: a 2x100 ReLU MLP on MNIST-1D trained by K = 8 workers
(SGD with momentum, the momentum averaged with the parameters), test accuracy against the number
of communications for mini-batch averaging, fixed periods, post-local SGD, increasing periods and
one-shot averaging. Same seeds and samples for every schedule."""

from __future__ import annotations

import os

from comm_sgd.mlp import MLPConfig, run_mlp_sweep
from experiments.registry import Section
from experiments.reporting import markdown_table, pyplot
from trainstep.runner import write_json_atomic

SCALES = {
    "small": {"steps": 2000, "seeds": 3, "batch": 16},
    "large": {"steps": 6000, "seeds": 5, "batch": 16},
}
SCHEDULES = ("every", "fixed:4", "fixed:16", "fixed:64", "fixed:256", "post-local:250:16", "increasing:1",
             "increasing:8", "once")


def run(out_dir: str, scale: str) -> Section:
    cfg = SCALES[scale]
    config = MLPConfig(dataset="mnist1d", workers=8, steps=cfg["steps"], batch=cfg["batch"], lr=0.05,
                       momentum=0.9, hidden=(100, 100), seeds=cfg["seeds"], seed=0)
    res = run_mlp_sweep(config, SCHEDULES, out_dir=os.path.join(out_dir, "runs"))
    results = {"config": {**config.__dict__, "hidden": list(config.hidden)}, **res}
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    _plot(out_dir, results)
    return Section("Local SGD on an MLP (MNIST-1D, K = 8 workers)", _markdown(results))


def _plot(out_dir, results):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    groups = {"fixed period": [], "post-local": [], "increasing": []}
    for name, r in results["schedules"].items():
        g = "post-local" if name.startswith("post") else "increasing" if name.startswith("incr") else "fixed period"
        groups[g].append((r["communications"], r["test_accuracy"], r["test_accuracy_std"], name))
    for (g, pts), style in zip(groups.items(), ("o-", "D", "s-"), strict=True):
        pts.sort()
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [100 * p[1] for p in pts], yerr=[100 * p[2] for p in pts], fmt=style,
                    capsize=3, label=g)
        for c, a, _, name in pts:
            ax.annotate(name, (c, 100 * a), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("communications")
    ax.set_ylabel("test accuracy (%)")
    c = results["config"]
    ax.set_title(f"MNIST-1D MLP, K = {c['workers']}, T = {c['steps']} steps, batch {c['batch']}/worker", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "mnist1d_accuracy.png"), dpi=110)
    plt.close(fig)


def _markdown(results) -> str:
    c = results["config"]
    rows = [[name, r["communications"], f"{100 * r['test_accuracy']:.1f} ± {100 * r['test_accuracy_std']:.1f} %",
             f"{r['test_loss']:.3f}"]
            for name, r in sorted(results["schedules"].items(), key=lambda kv: -kv[1]["communications"])]
    table = markdown_table(["schedule", "communications", f"test accuracy ({c['seeds']} seeds)", "test loss"], rows)
    best = max(results["schedules"].items(), key=lambda kv: kv[1]["test_accuracy"])
    return (
        f"MLP {c['hidden']} on MNIST-1D (standard 4,000/1,000 split), {c['workers']} workers sampling the whole "
        f"training set, batch {c['batch']} each, SGD with momentum {c['momentum']} and step size {c['lr']}, "
        f"T = {c['steps']} steps per worker; the momentum buffers are averaged with the parameters. "
        f"Best: `{best[0]}` ({100 * best[1]['test_accuracy']:.1f} %).\n\n" + table
        + "\n\n![MNIST-1D](comm_sgd_mlp/mnist1d_accuracy.png)\n"
    )
