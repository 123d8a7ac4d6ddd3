"""Stich (2019), local SGD converges fast and communicates little: suboptimality against the
number of workers K for several averaging periods H, on L2-regularised logistic regression with a
known optimum, with Stich's step size 4 / (mu (a + t)) and (a + t)^2-weighted output average.

Every configuration runs the same seeds, and worker w of seed s draws the same samples whatever H
is (common random numbers), so ratios between periods are paired comparisons.
"""

from __future__ import annotations

import math
import os

import numpy as np

from comm_sgd.logreg import LogregConfig, run_logreg, synthetic_problem
from experiments.registry import Section
from experiments.reporting import markdown_table, pyplot
from trainstep.runner import write_json_atomic

WORKERS = (1, 2, 4, 8, 16)
PERIODS = (1, 8, 32, 128)
SLOPE_RANGE = (-1.1, -0.85)
WITHIN = 0.10  # H <= sqrt(T/K) within 10 % of mini-batch averaging

SCALES = {
    "small": {"n": 4096, "d": 20, "scale": 3.0, "l2": 1e-2, "steps": 8000, "batch": 1, "seeds": 20},
    "large": {"n": 8192, "d": 50, "scale": 3.0, "l2": 1e-2, "steps": 32000, "batch": 1, "seeds": 50},
}


def _slope(ks, subs) -> float:
    return float(np.polyfit(np.log(ks), np.log(subs), 1)[0])


def run(out_dir: str, scale: str) -> Section:
    cfg = SCALES[scale]
    T, S = cfg["steps"], cfg["seeds"]
    problem = synthetic_problem(cfg["n"], cfg["d"], cfg["scale"], cfg["l2"], seed=0)
    runs = {}
    for H in PERIODS:
        for K in WORKERS:
            config = LogregConfig(workers=K, steps=T, batch=cfg["batch"], schedule="every" if H == 1 else f"fixed:{H}",
                                  lr="stich", average="stich", seeds=S, seed=0)
            r = run_logreg(problem, config, desc=f"Stich H={H} K={K}")
            runs[(H, K)] = {"H": H, "K": K, "communications": r["communications"], "shift_a": r["shift_a"],
                            "suboptimality": r["suboptimality"], "suboptimality_per_seed": r["suboptimality_per_seed"],
                            "wall_s": r["wall_s"]}
    results = {"problem": {"n": cfg["n"], "d": cfg["d"], "scale": cfg["scale"], "l2": cfg["l2"],
                           "condition_number": problem.condition_number, "f_star": problem.f_star},
               "steps_per_worker": T, "batch": cfg["batch"], "seeds": S, "runs": list(runs.values()),
               "slopes": {}, "ratios_to_minibatch": []}
    for H in PERIODS:
        subs = [runs[(H, K)]["suboptimality"] for K in WORKERS]
        ok_k = [K for K in WORKERS if H <= math.sqrt(T / K)]
        slope_ok = _slope(ok_k, [runs[(H, K)]["suboptimality"] for K in ok_k]) if len(ok_k) >= 2 else None
        results["slopes"][str(H)] = {
            "slope_all_K": _slope(WORKERS, subs),
            "K_with_H_le_sqrt_T_over_K": ok_k,
            "slope_where_H_le_sqrt_T_over_K": slope_ok,
            "in_target": None if slope_ok is None else bool(SLOPE_RANGE[0] <= slope_ok <= SLOPE_RANGE[1]),
        }
        for K in WORKERS:
            per_seed = np.asarray(runs[(H, K)]["suboptimality_per_seed"]) / np.asarray(
                runs[(1, K)]["suboptimality_per_seed"])
            ratio = runs[(H, K)]["suboptimality"] / runs[(1, K)]["suboptimality"]
            results["ratios_to_minibatch"].append({
                "H": H, "K": K, "ratio": ratio, "paired_ratio_se": float(per_seed.std(ddof=1) / math.sqrt(S)),
                "communication_reduction": runs[(1, K)]["communications"] / runs[(H, K)]["communications"],
                "H_le_sqrt_T_over_K": H <= math.sqrt(T / K), "within_10pct": bool(ratio <= 1 + WITHIN)})
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    _plot(out_dir, results, runs)
    return Section("Local SGD (Stich 2019): linear speed-up in the number of workers", _markdown(results, runs))


def _plot(out_dir, results, runs):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    S = results["seeds"]
    for H in PERIODS:
        m = np.array([runs[(H, K)]["suboptimality"] for K in WORKERS])
        se = np.array([np.std(runs[(H, K)]["suboptimality_per_seed"], ddof=1) / math.sqrt(S) for K in WORKERS])
        slope = results["slopes"][str(H)]["slope_all_K"]
        ax.errorbar(WORKERS, m, yerr=se, marker="o", capsize=3, label=f"H = {H} (slope {slope:.2f})")
    ref = runs[(1, 1)]["suboptimality"]
    ax.plot(WORKERS, [ref / k for k in WORKERS], "k:", label="1/K")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers K")
    ax.set_ylabel("f(x̂) − f*  (mean ± s.e. over seeds)")
    ax.set_title(f"local SGD, T = {results['steps_per_worker']} steps per worker", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "speedup.png"), dpi=110)
    plt.close(fig)


def _markdown(results, runs) -> str:
    T, S = results["steps_per_worker"], results["seeds"]
    p = results["problem"]
    rows = []
    for H in PERIODS:
        cells = []
        for K in WORKERS:
            r = runs[(H, K)]
            se = np.std(r["suboptimality_per_seed"], ddof=1) / math.sqrt(S)
            mark = "" if H <= math.sqrt(T / K) else " †"
            cells.append(f"{r['suboptimality']:.3g} ± {se:.1g}{mark}")
        sl = results["slopes"][str(H)]
        ok = sl["slope_where_H_le_sqrt_T_over_K"]
        ok_text = "–" if ok is None else f"{ok:.3f} (K ∈ {sl['K_with_H_le_sqrt_T_over_K']})" + (
            "" if sl["in_target"] else " **outside**")
        rows.append([f"H = {H}", f"{runs[(H, 1)]['communications']}", *cells, f"{sl['slope_all_K']:.3f}", ok_text])
    table = markdown_table(["period", "communications", *[f"K = {K}" for K in WORKERS], "slope (all K)",
                            "slope where H ≤ √(T/K)"], rows)
    rrows = []
    for e in results["ratios_to_minibatch"]:
        if e["H"] == 1 or not e["H_le_sqrt_T_over_K"]:
            continue
        rrows.append([f"H = {e['H']}, K = {e['K']}", f"{e['ratio']:.3f} ± {e['paired_ratio_se']:.3f}",
                      f"{e['communication_reduction']:.0f}×", "yes" if e["within_10pct"] else "**no**"])
    rtable = markdown_table(["setting (H ≤ √(T/K))", "suboptimality / mini-batch (paired s.e.)",
                             "fewer communications", "within 10 %"], rrows)
    return (
        f"Logistic regression, synthetic n = {p['n']}, d = {p['d']}, L2 = {p['l2']:g} (condition number "
        f"{p['condition_number']:.1f}), f* by Newton's method. T = {T} steps per worker, batch "
        f"{results['batch']} per worker, step size 4/(μ(a+t)) with a = max(16κ, H) + 1, output weighted by "
        f"(a+t)², {S} seeds. Cells: suboptimality mean ± standard error; † marks H > √(T/K), outside the "
        "theorem's linear speed-up regime. Target: slope in [−1.1, −0.85] where H ≤ √(T/K).\n\n"
        + table + "\n\n" + rtable + "\n\n![speed-up](comm_sgd_local/speedup.png)\n"
    )
