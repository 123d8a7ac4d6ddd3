"""Meta-learned unsupervised update rules (Metz et al. 2019): meta-train, then few-shot on held-out MNIST-1D.

A rule is meta-trained (``python -m meta_rules meta-train`` defaults: truncated backprop, digits-derived
and synthetic clustered tasks) and applied to fresh base MLPs on MNIST-1D, which meta-training never
sees: at the meta-training size, at 4x width, at 2x depth and with a step activation (no gradient
exists). Each is scored by 10- and 50-shot episodes (10-way; ridge and logistic readouts) against
random initialisation, an autoencoder trained with Adam for the same number of steps, PCA of the
same width and the raw input, over 10 base-network seeds x 30 episodes; and along inner steps
(ridge readout) 0, 10, 100, 1000 at the base size, 0, 10, 100 for the other networks (small scale).
Targets (issue "meta_rules"): the learned rule beats random initialisation by >= 3 points and at
least matches the autoencoder at the same number of steps in 10- and 50-shot; it still beats random
initialisation at 4x width and 2x depth; on a step network it beats random step features by >= 5 points.

Selection of the rule, without MNIST-1D: several meta-training seeds are run and the one with the
highest validation score is kept, the validation score being the 10-shot ridge accuracy (10-way, after
the same EVAL_STEPS inner steps) on the held-out digits test split (``trainstep.load_digits``' test
part; meta-training draws its digits tasks from the train split only). MNIST-1D is then evaluated for
the selected rule; the MNIST-1D figures of every seed are reported afterwards, to show the spread, and
play no part in the choice.
"""

from __future__ import annotations

import os
import shutil
import time

import jax
import numpy as np

from experiments.registry import Section
from experiments.reporting import markdown_table, pyplot
from meta_rules.cli import load_eval_data, load_rule, meta_train_config, run_meta_train
from meta_rules.evaluate import METHODS, FewShotConfig, evaluate_methods
from trainstep.runner import write_json_atomic

SCALES = {
    "small": {"meta": {}, "meta_seeds": (0, 1, 2), "seeds": 10, "episodes": 30, "curve": (10, 100, 1000),
              "curve_other": (10,), "val_seeds": 5},
    "large": {"meta": {"steps": 2000, "tasks": 16}, "meta_seeds": (0, 1, 2, 3, 4), "seeds": 20, "episodes": 50,
              "curve": (10, 100, 1000, 3000), "curve_other": (10, 1000), "val_seeds": 10},
}
EVAL_STEPS = 100  # N: inner steps of the rule and the autoencoder in the tables
GAIN_OVER_RANDOM = 0.03
GAIN_STEP = 0.05


def settings(width: int, depth: int) -> dict:
    """The four evaluated base networks: ``(hidden widths, activation)`` by name."""
    return {
        "base": ((width,) * depth, "relu"),
        "4x width": ((4 * width,) * depth, "relu"),
        "2x depth": ((width,) * (2 * depth), "relu"),
        "step": ((width,) * depth, "step"),
    }


def validation_data():
    """``(x, y)``: the held-out digits test split, which meta-training (digits train split) never sees."""
    from trainstep.data import load_digits

    d = load_digits()
    return d.x_test, d.y_test


def ridge10(ev: dict, method: str = "rule") -> float:
    """10-shot ridge accuracy of ``method`` in an :func:`evaluate_methods` result."""
    return ev["methods"][method]["ridge"]["10"]["mean"]


def select_seed(validation: dict) -> int:
    """The meta-training seed with the highest validation score (ties: the smallest seed)."""
    return max(sorted(validation), key=lambda s: validation[s])


def run(out_dir: str, scale: str) -> Section:
    cfg = SCALES[scale]
    defaults = meta_train_config(**cfg["meta"])
    width, depth = defaults["width"], defaults["depth"]
    base_hidden = (width,) * depth
    x_val, y_val = validation_data()
    x, y, source = load_eval_data(None, "mnist1d")
    one_shot = lambda seeds: FewShotConfig(shots=(10,), queries=20, episodes=cfg["episodes"], seeds=seeds,
                                           batch_size=defaults["batch"])
    seeds_out, rules = {}, {}
    t_all = time.perf_counter()
    for seed in cfg["meta_seeds"]:  # 1. meta-train every seed, score each on the validation tasks only
        meta_config = meta_train_config(**cfg["meta"], seed=seed)
        meta_dir = os.path.join(out_dir, "runs", f"meta_train_seed{seed}")
        t0 = time.perf_counter()
        meta = run_meta_train(meta_config, meta_dir, checkpoint_every=50, progress=False)
        wall = time.perf_counter() - t0
        theta, rule_config, _ = load_rule(meta_dir)
        rules[seed] = (theta, rule_config, meta_dir)
        val = evaluate_methods(theta, rule_config, x_val, y_val, hidden=base_hidden, activation="relu",
                               steps=EVAL_STEPS, config=one_shot(cfg["val_seeds"]), methods=("rule", "random"),
                               key=jax.random.key(1), source="digits/test")
        seeds_out[seed] = {"config": meta_config, "metrics": meta["metrics"], "wall_s": wall,
                           "curve": meta["curves"]["loss"], "validation_rule": ridge10(val),
                           "validation_random": ridge10(val, "random")}
    selected = select_seed({s: v["validation_rule"] for s, v in seeds_out.items()})
    for seed, (theta, rule_config, _) in rules.items():  # 2. after the choice: MNIST-1D of every seed (spread)
        ev = evaluate_methods(theta, rule_config, x, y, hidden=base_hidden, activation="relu", steps=EVAL_STEPS,
                              config=one_shot(cfg["seeds"]), methods=("rule", "random"), key=jax.random.key(0),
                              source=source)
        seeds_out[seed].update(mnist1d_rule=ridge10(ev), mnist1d_random=ridge10(ev, "random"))
    selection_wall = time.perf_counter() - t_all
    theta, rule_config, meta_dir = rules[selected]
    meta_config = seeds_out[selected]["config"]
    shutil.copy(os.path.join(meta_dir, "theta.npz"), os.path.join(out_dir, "theta.npz"))  # runs/ is not in git
    _plot_meta_loss(out_dir, seeds_out, selected)
    protocol = FewShotConfig(shots=(10, 50), queries=20, episodes=cfg["episodes"], seeds=cfg["seeds"],
                             batch_size=meta_config["batch"])
    evals, walls = {}, {}
    for name, (hidden, activation) in settings(width, depth).items():  # 3. the selected rule on MNIST-1D
        t0 = time.perf_counter()
        evals[name] = evaluate_methods(theta, rule_config, x, y, hidden=hidden, activation=activation,
                                       steps=EVAL_STEPS, curve_steps=cfg["curve"] if name == "base"
                                       else cfg["curve_other"], config=protocol,
                                       key=jax.random.key(0), source=source)
        walls[name] = time.perf_counter() - t0
    targets = check_targets(evals)
    results = {"selection": {"rule": "argmax over meta-training seeds of the 10-shot ridge accuracy on the "
                                     f"digits test split after {EVAL_STEPS} inner steps (MNIST-1D unused)",
                             "selected_seed": selected, "wall_s": selection_wall,
                             "validation_base_seeds": cfg["val_seeds"], "validation_episodes": cfg["episodes"],
                             "validation_n": int(len(y_val)),
                             "seeds": {str(s): {k: v for k, v in o.items() if k != "curve"}
                                       for s, o in seeds_out.items()}},
               "meta_train": {"config": meta_config, "metrics": seeds_out[selected]["metrics"],
                              "wall_s": seeds_out[selected]["wall_s"]},
               "eval_steps": EVAL_STEPS, "evaluations": evals, "eval_wall_s": walls, "targets": targets}
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    _plot(out_dir, evals)
    return Section("Meta-learned unsupervised update rules: few-shot accuracy on held-out MNIST-1D",
                   _markdown(results))


def _plot_meta_loss(out_dir: str, seeds_out: dict, selected: int) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for seed, o in seeds_out.items():
        ax.plot(o["curve"]["step"], o["curve"]["value"], lw=2.0 if seed == selected else 1.0,
                label=f"seed {seed}" + (" (selected)" if seed == selected else ""))
    ax.set_xlabel("meta-step")
    ax.set_ylabel("meta-loss (cosine ridge readout)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "meta_loss.png"), dpi=120)
    plt.close(fig)


def _mean(evals, setting, method, shots, readout="ridge"):
    return evals[setting]["methods"][method][readout][str(shots)]["mean"]


def check_targets(evals: dict) -> list[dict]:
    """Each target of the issue with the measured figures (ridge readout) and whether it is met."""
    out = []
    for shots in (10, 50):
        r, rnd, ae = (_mean(evals, "base", m, shots) for m in ("rule", "random", "autoencoder"))
        out.append({"target": f"base, {shots}-shot: rule >= random + {GAIN_OVER_RANDOM:.2f}", "rule": r,
                    "reference": rnd, "met": bool(r >= rnd + GAIN_OVER_RANDOM)})
        out.append({"target": f"base, {shots}-shot: rule >= autoencoder ({EVAL_STEPS} steps)", "rule": r,
                    "reference": ae, "met": bool(r >= ae)})
    for shots in (10, 50):  # the same comparison at the longest step count of the curves (ridge)
        curves = evals["base"]["curves"]
        i = len(curves["rule"]["step"]) - 1
        r, ae = curves["rule"][str(shots)][i]["mean"], curves["autoencoder"][str(shots)][i]["mean"]
        out.append({"target": f"base, {shots}-shot: rule >= autoencoder ({curves['rule']['step'][i]} steps)",
                    "rule": r, "reference": ae, "met": bool(r >= ae)})
    for setting in ("4x width", "2x depth"):
        for shots in (10, 50):
            r, rnd = _mean(evals, setting, "rule", shots), _mean(evals, setting, "random", shots)
            out.append({"target": f"{setting}, {shots}-shot: rule > random", "rule": r, "reference": rnd,
                        "met": bool(r > rnd)})
    for shots in (10, 50):
        r, rnd = _mean(evals, "step", "rule", shots), _mean(evals, "step", "random", shots)
        out.append({"target": f"step activation, {shots}-shot: rule >= random + {GAIN_STEP:.2f}", "rule": r,
                    "reference": rnd, "met": bool(r >= rnd + GAIN_STEP)})
    return out


def _plot(out_dir: str, evals: dict) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(evals), figsize=(3.6 * len(evals), 6.0), sharey="row")
    for col, (name, ev) in enumerate(evals.items()):
        for row, shots in enumerate((10, 50)):
            ax = axes[row, col]
            for method, style in (("rule", "-o"), ("autoencoder", "-s")):
                curve = ev["curves"][method]
                steps = np.asarray(curve["step"])
                mean = np.array([s["mean"] for s in curve[str(shots)]])
                sd = np.array([s["seed_std"] for s in curve[str(shots)]])
                ax.plot(np.maximum(steps, 1), mean, style, ms=3, label=f"{method}")
                ax.fill_between(np.maximum(steps, 1), mean - sd, mean + sd, alpha=0.2)
            for method, ls in (("pca", "--"), ("raw", ":")):
                ax.axhline(ev["methods"][method]["ridge"][str(shots)]["mean"], ls=ls, color="gray", lw=1,
                           label=method)
            ax.set_xscale("log")
            ax.set_title(f"{name}, {shots}-shot", fontsize=9)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("inner steps (step 0 plotted at 1: random init)")
            if col == 0:
                ax.set_ylabel("ridge accuracy (10-way)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy_vs_steps.png"), dpi=110)
    plt.close(fig)


def _pm(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def _markdown(results: dict) -> str:
    meta, evals = results["meta_train"], results["evaluations"]
    c = meta["config"]
    m = meta["metrics"]
    sel = results["selection"]
    srows = [[f"{s}" + (" (selected)" if int(s) == sel["selected_seed"] else ""),
              f"{o['metrics']['meta_loss_first']:.4f} -> {o['metrics']['meta_loss_last']:.4f}",
              f"{o['validation_rule']:.3f}", f"{o['validation_random']:.3f}", f"{o['mnist1d_rule']:.3f}",
              f"{o['mnist1d_random']:.3f}", f"{o['mnist1d_rule'] - o['mnist1d_random']:+.3f}"]
             for s, o in sel["seeds"].items()]
    parts = [
        f"**Selection of the rule (MNIST-1D not used).** {len(srows)} meta-training seeds, each with the "
        f"settings below; the rule kept is the {sel['rule']}. MNIST-1D figures of every seed were computed "
        "only after the choice, to show the spread (10-shot ridge, base network, "
        f"{EVAL_STEPS} inner steps; validation over {sel['validation_base_seeds']} base-network seeds x "
        f"{sel['validation_episodes']} episodes on the {sel['validation_n']} digits test images). "
        "The meta-training keys are `jax.random.split(key(seed), 3)`; an earlier version of this experiment "
        "had picked its seed by MNIST-1D accuracy, which this replaces. "
        f"Meta-training, selection and per-seed figures: {sel['wall_s']:.0f} s.\n\n"
        + markdown_table(["meta seed", "meta-loss first -> last tenth", "digits-test rule", "digits-test random",
                          "MNIST-1D rule", "MNIST-1D random", "MNIST-1D gain"], srows),
        f"Meta-training (selected seed {sel['selected_seed']}): {c['estimator']}, {c['steps']} meta-steps of "
        f"{c['tasks']} vmapped tasks "
        f"({c['num_classes']}-way "
        f"digits with class subsets, pixel permutations, noise and shifts; {c['clustered_weight']:.0%} synthetic "
        f"clusters), base MLP 64-{'-'.join([str(c['width'])] * c['depth'])} ({c['activation']}, batch norm), "
        f"episodes of {c['len_min']}-{c['len_max']} inner steps in truncations of {c['trunc_min']}-"
        f"{c['trunc_max']}, outer Adam {c['lr']:g} with clipping {c['clip']:g}; rule step sizes bounded by "
        f"{c['max_step']:g} "
        f"with the harmonic schedule 1/(1 + t/{c['decay_steps']:g}). Meta-loss (cosine ridge "
        f"readout along the trajectory) {m['meta_loss_first']:.4f} (first tenth) -> {m['meta_loss_last']:.4f} "
        f"(last tenth); {meta['wall_s']:.0f} s. Curves (every seed): `meta_rules/meta_loss.png`; θ: "
        "`meta_rules/theta.npz` (`python -m meta_rules evaluate --rule results/meta_rules ...`).",
        f"Evaluation on MNIST-1D (never seen in meta-training), all 5,000 examples, 10-way; "
        f"{EVAL_STEPS} inner steps for the rule and the autoencoder (Adam 1e-3, linear decoder); "
        "mean ± std over seeds × episodes; ridge and logistic readouts on centred unit-norm features.",
    ]
    for name, ev in evals.items():
        setup = ev["setup"]
        rows = [[method] + [_pm(ev["methods"][method][r][s]) for r in ("ridge", "logistic") for s in ("10", "50")]
                for method in METHODS]
        parts.append(f"**{name}** (MLP {'-'.join(map(str, setup['sizes']))}, {setup['activation']}; "
                     f"{results['eval_wall_s'][name]:.0f} s)\n\n"
                     + markdown_table(["method", "ridge 10-shot", "ridge 50-shot", "logistic 10-shot",
                                       "logistic 50-shot"], rows))
    trows = [[t["target"], f"{t['rule']:.3f}", f"{t['reference']:.3f}", "yes" if t["met"] else "**no**"]
             for t in results["targets"]]
    parts.append("Targets (ridge readout):\n\n" + markdown_table(["target", "rule", "reference", "met"], trows))
    parts.append("![accuracy against inner steps](meta_rules/accuracy_vs_steps.png)")
    return "\n\n".join(parts) + "\n"
