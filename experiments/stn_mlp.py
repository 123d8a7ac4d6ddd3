"""Self-Tuning Networks on the MNIST-1D MLP against the hyperparameter searches, in one harness.

STN and linearised Delta-STN tune six regularisers of a 40-100-100-10 MLP (input dropout, two
hidden dropouts, Gaussian input noise, weight decay, random-shift magnitude) within one training
run; fixed values, grid search, random search and optuna TPE train plain networks with the same
number of weight steps on the same split and select by validation loss (``stn_jax.baselines``,
driven through ``stn_jax.mlp_cli.run_mlp``, the code of ``python -m stn_jax mlp``). Target (issue
"stn_jax"): STN's test accuracy at least that of the best of random search (10 trials) and grid
search, at a cost of at most 2.5 plain runs; optuna reported beside them.
"""

from __future__ import annotations

import math

from experiments.registry import Section
from experiments.reporting import markdown_table
from stn_jax.baselines import GRID_GROUPS, METHODS, grid_levels, optuna_available
from stn_jax.mlp import SEARCH_SPACE, mlp_space
from stn_jax.mlp_cli import TARGET_BUDGET, TARGET_COST_RUNS, run_mlp

SCALES = {
    "small": {"seeds": 3, "steps": 2000, "budget": TARGET_BUDGET},
    "large": {"seeds": 5, "steps": 6000, "budget": TARGET_BUDGET},
}


def config(scale: str) -> dict:
    """The ``run_mlp`` configuration of a scale (all methods; optuna when it is installed)."""
    c = SCALES[scale]
    steps = c["steps"]
    methods = [m for m in METHODS if m != "optuna" or optuna_available()]
    return {"dataset": "mnist1d", "seeds": c["seeds"], "budget": c["budget"], "steps": steps, "methods": methods,
            "hidden": [100, 100], "lr": 1e-2,
            "stn": {"warmup": steps // 12, "t_train": 5, "hyper_lr": 3e-3, "entropy_weight": 1e-3},
            "optuna_batch": -(-c["budget"] // 3)}


def run(out_dir: str, scale: str) -> Section:
    results = run_mlp(config(scale), out_dir, progress=False)
    return Section("Self-Tuning Networks on an MLP (MNIST-1D): STN and Delta-STN against grid, random and "
                   "optuna search", _markdown(results))


def _pm(m: dict, key: str, fmt: str, scale: float = 1.0) -> str:
    return f"{scale * m[key]:{fmt}} ± {scale * m[key + '_std']:{fmt}}"


def _markdown(results: dict) -> str:
    c, methods, t = results["config"], results["methods"], results["metrics"]["target"]
    rows = []
    for name, m in methods.items():
        compute = f" ({m['cost_runs_compute']:.2f} without compilation)" if "cost_runs_compute" in m else ""
        if "cost_runs_compute" in m:
            compute += f"; seed 0, compiling: {m['per_seed'][0]['cost_runs']:.2f}"
        rows.append([name, _pm(m, "val_loss", ".4f"), _pm(m, "test_loss", ".4f"),
                     _pm(m, "test_accuracy", ".1f", 100.0) + " %", _pm(m, "cost_runs", ".2f") + compute,
                     _pm(m, "wall_s", ".1f"), _pm(m, "wall_runs", ".2f") if "wall_runs" in m else "–"])
    table = markdown_table(["method", "validation loss", "test loss", "test accuracy", "cost (plain runs)",
                            "wall s", "wall (plain runs)"], rows)
    if t["evaluated"]:
        verdict = (
            f"**Target** (STN's test accuracy ≥ the best of random search with {TARGET_BUDGET} trials and grid "
            f"search, at ≤ {TARGET_COST_RUNS:g} plain runs; means over seeds): STN "
            f"{100 * t['stn_test_accuracy']:.1f} % against {t['best_search']} "
            f"{100 * t['best_search_test_accuracy']:.1f} %: "
            f"accuracy {'met' if t['accuracy_holds'] else '**not met**'}; "
            f"cost {t['stn_cost_runs']:.2f} plain runs "
            f"(wall; {t['stn_cost_runs_compute']:.2f} without compilation): "
            f"{'met' if t['cost_holds'] else '**not met**'}. Overall: {'met' if t['holds'] else '**not met**'}"
            f"{'' if t['budget_is_target'] else ' (at a budget other than the target one)'}.")
    else:
        verdict = f"Target not evaluated: {t['why']}."
    moved = ""
    if "stn" in methods:
        space = mlp_space()
        init = space.values(space.init_unconstrained())
        final = {k: sum(r["hparams"][k] for r in methods["stn"]["per_seed"]) / len(methods["stn"]["per_seed"])
                 for k in init}
        moved = (" STN's final hyperparameters (mean over seeds) from its initial values: "
                 + ", ".join(f"{k} {init[k]:.3g} → {final[k]:.3g}" for k in init) + ".")
    frozen = ""
    if "stn" in methods and "stn-frozen" in methods and "fixed" in methods:
        acc = {k: 100 * methods[k]["test_accuracy"] for k in ("stn", "stn-frozen", "fixed")}
        frozen = (f" `stn-frozen` is the control of STN's architecture: the same best-response network, perturbation "
                  f"and warm-up with a hyper step size of 0, so nothing is tuned. Tuning adds "
                  f"{acc['stn'] - acc['stn-frozen']:+.1f} points of test accuracy over it (STN {acc['stn']:.1f} % "
                  f"against "
                  f"{acc['stn-frozen']:.1f} %), and the architecture with its perturbation by itself "
                  f"{acc['stn-frozen'] - acc['fixed']:+.1f} points over the plain network at the same values "
                  f"(`fixed`, {acc['fixed']:.1f} %).")
    opt = methods.get("optuna")
    optuna = (f" Optuna TPE (10 trials, {c['optuna_batch']} per vmapped batch): "
              f"{100 * opt['test_accuracy']:.1f} ± {100 * opt['test_accuracy_std']:.1f} %." if opt else
              " Optuna is not installed, so its row is missing.")
    s = c["stn"]
    levels = grid_levels(c["budget"])
    grid = ", ".join(f"{g.replace('_', ' ')} {n}" for g, n in zip(GRID_GROUPS, levels, strict=True))
    return (
        f"MLP {c['hidden']} on MNIST-1D ({results['data']['n_train']} training, {results['data']['n_val']} "
        f"validation, {results['data']['n_test']} test examples; the validation split is the same for every method "
        f"and seed), {c['steps']} Adam steps (lr {c['lr']:g}, batch {c['batch']}) per run, {c['seeds']} seeds "
        f"(mean ± std). Tuned: input dropout, two hidden dropouts, input noise, weight decay, random-shift magnitude. "
        f"STN / Delta-STN: {s['warmup']} warm-up steps at the initial values, then cycles of {s['t_train']} weight "
        f"steps and 1 hyper step (Adam {s['hyper_lr']:g}, entropy weight {s['entropy_weight']:g}); STN's "
        "hypernetwork sees the offset of the hyperparameters from their initial values (`centre_at_init`: with the raw "
        "unconstrained values the untuned best-response network lost about 8 points against the plain one); "
        f"`fixed` is a plain run at STN's initial values and the unit of cost. Searches select by validation loss over "
        f"{c['budget']} trials (grid: levels {grid}, {math.prod(levels)} trials), trials vmapped with common "
        "random numbers; their cost is their number of trials, STN's is its "
        "wall time over the fixed run's (same seed and process). Walls are noisy on a shared 2-core machine."
        f" Search ranges: dropout rates 0 to {SEARCH_SPACE['dropout1'][1]:g}, input noise "
        f"{SEARCH_SPACE['input_noise'][0]:g} to {SEARCH_SPACE['input_noise'][1]:g} and weight decay "
        f"{SEARCH_SPACE['weight_decay'][0]:g} to {SEARCH_SPACE['weight_decay'][1]:g} (log-uniform), shift 0 to "
        f"{SEARCH_SPACE['shift'][1]:g}. Every run, plain or STN, takes its weight steps with the same Adam. "
        "Compiled programs take the seed's keys and the data as arguments, so seeds after the first reuse them: "
        "the cost column is the mean over seeds of STN's wall over the fixed run's (seed 0's ratio, both compiling, "
        "beside it) and, in brackets, the same with compilation taken out. The last column is every method's wall "
        "in plain runs of the same seed: a search's vmapped trials take less wall than their count of runs."
        f"\n\n{table}\n\n{verdict}{frozen}{optuna}{moved}\n\n"
        "![best validation loss against cost](stn_mlp/cost.png)\n\n"
        "![STN hyperparameter schedules](stn_mlp/schedules.png)\n"
    )
