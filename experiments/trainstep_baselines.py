"""Plain supervised baselines through ``trainstep``'s runner (the foundation experiment).

MNIST-1D with the published recipe of the ``mnist1d`` reference code (Adam, learning rate 1e-2,
batch 100, 6,000 steps, the whole standard 4,000-example training split, no weight decay), for
logistic regression and the 2x100 ReLU MLP; published test accuracies are about 32 % and 68 %.
The same models on scikit-learn digits for reference, and the MNIST-1D MLP with a held-out
validation split (the setting the STN and local SGD experiments build on).
"""

from __future__ import annotations

import os

import numpy as np

from experiments.registry import Section
from experiments.reporting import fmt_pm, markdown_table, mean_std, pyplot
from trainstep.cli import train_classifier, train_config
from trainstep.runner import write_json_atomic

PUBLISHED = {("mnist1d", "linear"): 0.32, ("mnist1d", "mlp"): 0.68}
TOLERANCE = 0.02  # "within a couple of points"

# (label, dataset, model, val_fraction, l2)
SETTINGS = [
    ("mnist1d / logistic regression", "mnist1d", "linear", 0.0, 0.0),
    ("mnist1d / MLP 2x100", "mnist1d", "mlp", 0.0, 0.0),
    ("mnist1d / MLP 2x100, 10 % held out for validation", "mnist1d", "mlp", 0.1, 0.0),
    ("digits / logistic regression", "digits", "linear", 0.1, 0.0),
    ("digits / MLP 2x100", "digits", "mlp", 0.1, 0.0),
]


def run(out_dir: str, scale: str) -> Section:
    seeds = 3 if scale == "small" else 10
    results = {"seeds": seeds, "settings": []}
    for label, dataset, model, val_fraction, l2 in SETTINGS:
        per_seed = []
        for seed in range(seeds):
            cfg = train_config(dataset=dataset, model=model, steps=6000, batch=100, lr=1e-2, optimizer="adam",
                               l2=l2, seed=seed, val_fraction=val_fraction)
            run_dir = os.path.join(out_dir, "runs", f"{dataset}_{model}_val{val_fraction:g}_seed{seed}")
            r = train_classifier(cfg, run_dir, progress=True)
            per_seed.append({"seed": seed, **r["metrics"], "wall_s": r["wall_s"],
                             "loss_curve": r["curves"]["loss"]})
        acc = [p["test_accuracy"] for p in per_seed]
        m, s = mean_std(acc)
        entry = {"label": label, "dataset": dataset, "model": model, "val_fraction": val_fraction,
                 "test_accuracy_mean": m, "test_accuracy_std": s, "per_seed": per_seed}
        if val_fraction == 0.0 and (dataset, model) in PUBLISHED:
            pub = PUBLISHED[(dataset, model)]
            entry |= {"published_test_accuracy": pub, "within_tolerance": abs(m - pub) <= TOLERANCE}
        results["settings"].append(entry)
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    _plot(out_dir, results)
    return Section("Foundation: plain training through `trainstep` (MNIST-1D baselines)", _markdown(results))


def _plot(out_dir: str, results: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for entry in results["settings"]:
        curves = np.array([p["loss_curve"]["value"] for p in entry["per_seed"]])
        steps = entry["per_seed"][0]["loss_curve"]["step"]
        ax.plot(steps, curves.mean(0), label=f"{entry['label']} ({100 * entry['test_accuracy_mean']:.1f} %)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss_curves.png"), dpi=110)
    plt.close(fig)


def _markdown(results: dict) -> str:
    rows = []
    for e in results["settings"]:
        acc = [p["test_accuracy"] for p in e["per_seed"]]
        pub = e.get("published_test_accuracy")
        rows.append([
            e["label"],
            f"{fmt_pm(acc, 100)} %",
            f"{100 * pub:.0f} %" if pub is not None else "–",
            ("yes" if e["within_tolerance"] else "**no**") if pub is not None else "–",
            f"{np.mean([p['wall_s'] for p in e['per_seed']]):.0f} s",
        ])
    table = markdown_table(["setting", f"test accuracy (mean ± std, {results['seeds']} seeds)", "published",
                            "within 2 points", "wall time / run"], rows)
    return (
        "Adam (learning rate 1e-2), batch 100, 6,000 steps, the runner's checkpointed chunks. "
        "The published MNIST-1D figures train on the whole 4,000-example training split, as the first "
        "two rows do.\n\n" + table + "\n\n![training loss](trainstep_baselines/loss_curves.png)\n"
    )
