"""Patel & Dieuleveut (2019), communication trade-offs with large step sizes: suboptimality
against the number of communications for mini-batch averaging (every step), fixed periods,
increasing periods and one-shot averaging, with large steps c t^(-alpha) and Polyak-Ruppert
averaging on logistic regression (non-quadratic, so the communication frequency matters), and the
one-shot vs mini-batch gap against the number of workers.

All schedules share seeds and samples (common random numbers), so their ratios are paired.
"""

from __future__ import annotations

import math
import os

import numpy as np

from comm_sgd.logreg import LogregConfig, run_logreg, synthetic_problem
from comm_sgd.schedules import parse_schedule
from experiments.registry import Section
from experiments.reporting import markdown_table, pyplot
from trainstep.runner import write_json_atomic

WITHIN = 0.10
SCALES = {
    "small": {"n": 4096, "d": 20, "scale": 3.0, "l2": 1e-2, "steps": 4000, "seeds": 20, "workers": 16,
              "lr": "poly:4:0.75", "gap_workers": (1, 2, 4, 8, 16)},
    "large": {"n": 8192, "d": 50, "scale": 3.0, "l2": 1e-2, "steps": 16000, "seeds": 50, "workers": 16,
              "lr": "poly:4:0.75", "gap_workers": (1, 2, 4, 8, 16, 32)},
}
FIXED_PERIODS = (2, 8, 32, 128, 512)
INCREASING_C = (0.25, 4.0, 16.0)


def _run(problem, cfg, K, schedule):
    config = LogregConfig(workers=K, steps=cfg["steps"], batch=1, schedule=schedule, lr=cfg["lr"],
                          average="uniform", seeds=cfg["seeds"], seed=0)
    r = run_logreg(problem, config, desc=f"PD K={K} {schedule}")
    return {"schedule": schedule, "K": K, "communications": r["communications"],
            "suboptimality": r["suboptimality"], "suboptimality_per_seed": r["suboptimality_per_seed"],
            "wall_s": r["wall_s"]}


def _se(values) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def _paired(a, b):
    """Ratio of mean suboptimalities and the s.e. of the per-seed ratio."""
    ra = np.asarray(a["suboptimality_per_seed"]) / np.asarray(b["suboptimality_per_seed"])
    return a["suboptimality"] / b["suboptimality"], _se(ra)


def run(out_dir: str, scale: str) -> Section:
    cfg = SCALES[scale]
    T, K = cfg["steps"], cfg["workers"]
    problem = synthetic_problem(cfg["n"], cfg["d"], cfg["scale"], cfg["l2"], seed=0)
    n_inc = parse_schedule("increasing:1").num_communications(T)
    h_same = max(1, round(T / n_inc))
    schedules = (["every", "increasing:1", f"fixed:{h_same}", "once"]
                 + [f"fixed:{h}" for h in FIXED_PERIODS if h != h_same]
                 + [f"increasing:{c:g}" for c in INCREASING_C])
    runs = {s: _run(problem, cfg, K, s) for s in schedules}
    every, inc, fixed_same, once = (runs[s] for s in ("every", "increasing:1", f"fixed:{h_same}", "once"))
    inc_vs_every = _paired(inc, every)
    inc_vs_fixed = _paired(inc, fixed_same)
    gap = []
    for k in cfg["gap_workers"]:
        e = runs["every"] if k == K else _run(problem, cfg, k, "every")
        o = runs["once"] if k == K else _run(problem, cfg, k, "once")
        ratio, se = _paired(o, e)
        gap.append({"K": k, "every": e["suboptimality"], "once": o["suboptimality"],
                    "every_se": _se(e["suboptimality_per_seed"]), "once_se": _se(o["suboptimality_per_seed"]),
                    "difference": o["suboptimality"] - e["suboptimality"], "ratio": ratio, "ratio_se": se})
    ratios = [g["ratio"] for g in gap]
    results = {
        "problem": {"n": cfg["n"], "d": cfg["d"], "scale": cfg["scale"], "l2": cfg["l2"],
                    "condition_number": problem.condition_number, "smoothness": problem.smoothness,
                    "f_star": problem.f_star},
        "steps_per_worker": T, "workers": K, "seeds": cfg["seeds"], "lr": cfg["lr"], "average": "uniform",
        "runs": list(runs.values()),
        "sqrt_2T": math.sqrt(2 * T),
        "increasing": {"communications": inc["communications"], "ratio_to_every": inc_vs_every[0],
                       "ratio_to_every_se": inc_vs_every[1],
                       "within_10pct_of_every": bool(inc_vs_every[0] <= 1 + WITHIN),
                       "fixed_same_communications": f"fixed:{h_same}",
                       "fixed_communications": fixed_same["communications"],
                       "ratio_to_fixed": inc_vs_fixed[0], "ratio_to_fixed_se": inc_vs_fixed[1],
                       "better_than_fixed": bool(inc["suboptimality"] < fixed_same["suboptimality"])},
        "one_shot_gap": gap,
        "one_shot_worse_for_all_K_gt_1": bool(all(g["once"] > g["every"] for g in gap if g["K"] > 1)),
        # The gap is relative (one-shot / mini-batch): both errors fall with K, the ratio grows.
        "gap_grows_with_K": bool(all(b > a for a, b in zip(ratios, ratios[1:], strict=False))),
    }
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    _plot(out_dir, results, runs, gap)
    return Section("Communication trade-offs with large steps (Patel & Dieuleveut 2019)", _markdown(results, runs))


def _plot(out_dir, results, runs, gap):
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.5, 4.0))
    def comms(r):
        return r["communications"]

    fixed = sorted((r for r in runs.values() if not r["schedule"].startswith("increasing")), key=comms)
    inc = sorted((r for r in runs.values() if r["schedule"].startswith("increasing")), key=comms)
    for rs, label, style in ((fixed, "fixed period (every … once)", "o-"), (inc, "increasing periods", "s-")):
        ax.errorbar([r["communications"] for r in rs], [r["suboptimality"] for r in rs],
                    yerr=[_se(r["suboptimality_per_seed"]) for r in rs], fmt=style, capsize=3, label=label)
        for r in rs:
            ax.annotate(r["schedule"], (r["communications"], r["suboptimality"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.axvline(results["sqrt_2T"], color="gray", ls=":", label="√(2T)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("communications")
    ax.set_ylabel("f(x̄) − f*  (mean ± s.e.)")
    ax.set_title(f"K = {results['workers']}, T = {results['steps_per_worker']}, steps {results['lr']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ks = [g["K"] for g in gap]
    ax2.errorbar(ks, [g["every"] for g in gap], yerr=[g["every_se"] for g in gap], fmt="o-", capsize=3,
                 label="mini-batch averaging (every step)")
    ax2.errorbar(ks, [g["once"] for g in gap], yerr=[g["once_se"] for g in gap], fmt="s-", capsize=3,
                 label="one-shot averaging")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("workers K")
    ax2.set_ylabel("f(x̄) − f*")
    ax2.set_title("one-shot vs mini-batch averaging", fontsize=9)
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "tradeoffs.png"), dpi=110)
    plt.close(fig)


def _markdown(results, runs) -> str:
    every = runs["every"]
    rows = []
    for r in sorted(runs.values(), key=lambda r: -r["communications"]):
        ratio = r["suboptimality"] / every["suboptimality"]
        se = _se(r["suboptimality_per_seed"])
        rows.append([r["schedule"], r["communications"], f"{r['suboptimality']:.3g} ± {se:.1g}", f"{ratio:.3f}"])
    table = markdown_table(["schedule", "communications", "f(x̄) − f* (mean ± s.e.)", "÷ every step"], rows)
    inc = results["increasing"]
    grows = "grows" if results["gap_grows_with_K"] else "**does not grow**"
    gap_rows = [[g["K"], f"{g['every']:.3g}", f"{g['once']:.3g}", f"{g['difference']:.3g}",
                 f"{g['ratio']:.2f} ± {g['ratio_se']:.2f}"] for g in results["one_shot_gap"]]
    gap_table = markdown_table(["K", "every step", "one-shot", "gap (difference)", "ratio (paired s.e.)"], gap_rows)
    p = results["problem"]
    return (
        f"Logistic regression, synthetic n = {p['n']}, d = {p['d']}, L2 = {p['l2']:g} (smoothness "
        f"{p['smoothness']:.3g}, condition number {p['condition_number']:.1f}). K = {results['workers']} workers, "
        f"T = {results['steps_per_worker']} steps each, batch 1, large steps γ_t = {results['lr']} "
        f"(c·t^(−α)), Polyak–Ruppert average, {results['seeds']} seeds.\n\n" + table + "\n\n"
        f"- `increasing:1` uses {inc['communications']} communications (√(2T) = {results['sqrt_2T']:.0f}); its "
        f"suboptimality is {inc['ratio_to_every']:.3f} ± {inc['ratio_to_every_se']:.3f} × mini-batch averaging's "
        f"({'within' if inc['within_10pct_of_every'] else '**not within**'} 10 %) and "
        f"{inc['ratio_to_fixed']:.3f} ± {inc['ratio_to_fixed_se']:.3f} × that of `{inc['fixed_same_communications']}` "
        f"({inc['fixed_communications']} communications): "
        f"{'better' if inc['better_than_fixed'] else '**not better**'}.\n"
        f"- One-shot averaging against mini-batch averaging: the relative gap (one-shot ÷ mini-batch, paired "
        f"over seeds) {grows} with K. Both errors fall as K grows, so the absolute difference need not "
        "grow: it is in the table too.\n\n"
        + gap_table + "\n\n![trade-offs](comm_sgd_tradeoffs/tradeoffs.png)\n"
    )
