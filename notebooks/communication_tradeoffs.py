# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Communication trade-offs for local SGD with large step sizes (Patel & Dieuleveut, 2019)
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/iclr19-optim-jax/iclr19-optim-jax/blob/main/notebooks/communication_tradeoffs.ipynb)
#
# $P$ workers (here $K$) run local SGD for $T$ steps each, with batch size 1, *large* step sizes
# $\gamma_t = c\, t^{-\alpha}$, $\alpha \in (1/2, 1)$, and Polyak–Ruppert (uniform) averaging of the
# iterates. Patel & Dieuleveut (NeurIPS 2019, [arXiv 1904.11325](https://arxiv.org/abs/1904.11325))
# bound the error of any communication schedule between two extremes:
#
# * **mini-batch averaging**: communicate after every step ($T$ communications);
# * **one-shot averaging**: communicate once, at the end.
#
# Asymptotically all schedules share the leading variance term. Before that, communicating more
# often helps a lot, and the gap between the extremes grows with $K$. On a quadratic the schedule
# would not matter at all (their bound's third-derivative constant $M$ is 0); on a non-quadratic
# loss such as logistic regression it does. But the iterates need less communication as they
# approach the optimum (as $\gamma_t$ shrinks), so the number $N_t$ of local steps after the $t$-th
# communication may grow: with $N_t \approx t$ only about $\sqrt{2T}$ communications are needed.
#
# `comm_sgd` writes these schedules as `every`, `fixed:H`, `increasing:c` (the $k$-th period has
# $\lceil c k \rceil$ local steps) and `once`.

# %%
import os
import sys

if "google.colab" in sys.modules:  # on Colab only; locally, `pip install -e .` from the repository
    # %pip install -q "git+https://github.com/iclr19-optim-jax/iclr19-optim-jax"
    print("installed trainstep and comm_sgd")

# %%
import jax
import matplotlib.pyplot as plt
import numpy as np

import comm_sgd
from comm_sgd.logreg import LogregConfig, run_logreg, synthetic_problem

# Sizes come from the environment so that CI can run this notebook small (TRAINSTEP_NB_STEPS=100).
STEPS = int(os.environ.get("TRAINSTEP_NB_STEPS", "4000"))  # T, local steps (= examples) per worker
FULL = STEPS >= 1000
SEEDS = 20 if FULL else 2  # independent runs, vectorised; results are means over seeds
K = 16  # workers
GAP_WORKERS = [1, 2, 4, 8, 16] if FULL else [1, 16]
LR = "poly:4:0.75"  # gamma_t = 4 (t + 1)^(-3/4)
print(f"T = {STEPS} steps, K = {K} workers, {SEEDS} seeds, step size {LR}, uniform averaging")
print("devices:", jax.devices())

# %% [markdown]
# ## 1. A non-quadratic regime
#
# Logistic regression on `synthetic_problem(4096, 20, 3.0, 1e-2)`: features of scale 3, so margins
# $y\,x^\top w$ are spread far from 0 where the logistic loss is far from its quadratic
# approximation, and $\mu = 10^{-2}$. The steps are large in the paper's sense: they decay like
# $t^{-3/4}$, much slower than the $1/(\mu t)$ of strongly convex SGD analyses, and the
# Polyak–Ruppert average removes the noise that such steps leave in the last iterate.

# %%
problem = synthetic_problem(4096, 20, 3.0, 1e-2)
print(f"{problem.name}: mu = {problem.l2:g}, L = {problem.smoothness:.4f}, kappa = {problem.condition_number:.1f}, "
      f"f* = {problem.f_star:.6f}")
gamma = comm_sgd.parse_step_size(LR, mu=problem.l2, a=1.0)
print(f"step sizes: gamma_0 = {float(gamma(0)):.2f} (gamma_0 L = {float(gamma(0)) * problem.smoothness:.2f}), "
      f"gamma_T = {float(gamma(STEPS)):.4f}")

# %% [markdown]
# ## 2. The schedules
#
# `increasing:1` communicates after steps $1, 3, 6, 10, \dots$ ($N_t = t$), that is about
# $\sqrt{2T}$ times. For a fair comparison we pick the fixed period with the same number of
# communications (or one fewer, when no period gives exactly that many), and
# `comm_sgd.increasing_for(C, T)` inverts the relation for any target count $C$. Every schedule also
# averages after the last step, so `once` is exactly one communication.

# %%
increasing = comm_sgd.increasing(1.0)
num_increasing = increasing.num_communications(STEPS)
period = next(h for h in range(1, STEPS + 1) if comm_sgd.fixed(h).num_communications(STEPS) <= num_increasing)
schedules = {
    "every": comm_sgd.every(),
    f"fixed:{period}": comm_sgd.fixed(period),
    "increasing:1": increasing,
    "once": comm_sgd.once(),
}
counts = {name: s.num_communications(STEPS) for name, s in schedules.items()}
print("communications:", counts, f"(sqrt(2T) = {np.sqrt(2 * STEPS):.1f})")
assert counts["every"] == STEPS and counts["once"] == 1
assert counts[f"fixed:{period}"] <= num_increasing  # the smallest period within the increasing schedule's budget
print("first periods of increasing:1:", np.diff(np.flatnonzero(increasing.mask(STEPS)) + 1, prepend=0)[:10])
print(f"increasing_for({num_increasing}, {STEPS}) = {comm_sgd.increasing_for(num_increasing, STEPS)}")

fig, ax = plt.subplots(figsize=(7, 2.4))
for row, s in enumerate(schedules.values()):
    ax.eventplot(np.flatnonzero(s.mask(STEPS)) + 1, lineoffsets=row, linelengths=0.7, linewidths=0.6)
ax.set_yticks(range(len(schedules)), [f"{name} ({counts[name]})" for name in schedules])
ax.invert_yaxis()
ax.set(xlabel="local step", xlim=(0, 1.02 * STEPS), title="when the workers average (communications in brackets)")
plt.show()

# %% [markdown]
# ## 3. Error against communications at $K = 16$
#
# `run_logreg` runs all seeds at once and returns the suboptimality $f(\bar w_T) - f^\star$ of the
# output (the workers' mean of their Polyak–Ruppert averages). At full size we add more fixed periods
# and increasing rates to trace each family's trade-off curve.


# %%
def run(workers, schedule):
    config = LogregConfig(workers=workers, steps=STEPS, seeds=SEEDS, schedule=str(schedule), lr=LR, average="uniform")
    r = run_logreg(problem, config, progress=False)
    assert r["communications"] == comm_sgd.parse_schedule(config.schedule).num_communications(STEPS)
    r["sem"] = float(np.std(r["suboptimality_per_seed"]) / np.sqrt(SEEDS))
    return r


families = {"fixed": [comm_sgd.every(), comm_sgd.fixed(period), comm_sgd.once()],
            "increasing": [increasing]}
if FULL:
    families["fixed"][2:2] = [comm_sgd.fixed(period // 3), comm_sgd.fixed(3 * period), comm_sgd.fixed(10 * period)]
    families["increasing"] = [comm_sgd.increasing(c) for c in (0.25, 1.0, 4.0, 16.0, 64.0)]

runs = {}
for members in families.values():
    for s in members:
        if s.spec not in runs:
            runs[s.spec] = run(K, s)
base = runs["every"]
for spec, r in sorted(runs.items(), key=lambda item: -item[1]["communications"]):
    print(f"{spec:>15}: {r['communications']:5d} communications, suboptimality {r['suboptimality']:.3e} "
          f"+- {r['sem']:.1e}  ({r['suboptimality'] / base['suboptimality']:.2f} x every)")

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
for family, members in families.items():
    rs = sorted((runs[s.spec] for s in members), key=lambda r: r["communications"])
    ax.errorbar([r["communications"] for r in rs], [r["suboptimality"] for r in rs], yerr=[r["sem"] for r in rs],
                marker="o", capsize=3, label=f"{family} schedules")
for name in schedules:
    r = runs[schedules[name].spec]
    ax.annotate(name, (r["communications"], r["suboptimality"]), textcoords="offset points",
                xytext=(5, -12) if name.startswith("increasing") else (5, 6), fontsize=8)
ax.axhline(base["suboptimality"], color="gray", ls=":", lw=1, label="level of every")
ax.set(xscale="log", yscale="log", xlabel="communications", ylabel=r"$f(\bar w_T) - f^\star$",
       title=f"K = {K}, T = {STEPS}, {LR}, uniform averaging ({SEEDS} seeds)")
ax.legend()
plt.show()

# %% [markdown]
# At full size ($T = 4000$, 20 seeds) the increasing family lies below the fixed one: with the same
# budget of about $\sqrt{2T} = 89$ communications, `increasing:1` is as good as communicating at
# every step (here even slightly better), while `fixed:45` has about twice the error. The increasing
# schedule spends its communications early, when the step sizes are large and the workers drift
# apart fastest, and few late, when they are small. Communicating at every step is not the optimum
# in this regime: a moderate number of local steps (`fixed:15`, `increasing:4`) lowers the error by
# 25-30 % (all schedules see the same samples, so these differences are larger than the seed noise
# suggests), while long fixed periods raise it quickly. Increasing schedules stay at the level of
# `every` down to about 20 communications (`increasing:16`); one-shot averaging is far behind.
#
# ## 4. One-shot against mini-batch averaging as $K$ grows
#
# With one worker there is nothing to average, and both are plain SGD. With more workers,
# mini-batch averaging improves much faster than one-shot averaging, so the ratio between them grows
# with $K$: averaging $K$ independent SGD runs at the end divides their variance by $K$ but keeps the
# bias that large steps leave in each run on a non-quadratic loss.

# %%
gap = {}
for k in GAP_WORKERS:
    if k == K:
        gap[k] = (runs["every"], runs["once"])
    elif k == 1:
        r = run(1, "every")
        gap[k] = (r, r)  # one worker: every schedule is the same run
    else:
        gap[k] = (run(k, "every"), run(k, "once"))
for k, (every, once) in gap.items():
    print(f"K = {k:2d}: every {every['suboptimality']:.3e}, once {once['suboptimality']:.3e}, "
          f"ratio once / every = {once['suboptimality'] / every['suboptimality']:.2f}")

fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(10, 3.6))
ks = np.array(GAP_WORKERS, float)
for i, name in enumerate(("every", "once")):
    ax.errorbar(ks, [gap[k][i]["suboptimality"] for k in GAP_WORKERS], yerr=[gap[k][i]["sem"] for k in GAP_WORKERS],
                marker="o", capsize=3, label=f"{name} ({'T communications' if name == 'every' else '1 communication'})")
ax.plot(ks, gap[GAP_WORKERS[0]][0]["suboptimality"] * ks[0] / ks, "k:", label="slope -1")
ax.set(xscale="log", yscale="log", xlabel="workers K", ylabel=r"$f(\bar w_T) - f^\star$")
ax.set_xticks(ks, [str(k) for k in GAP_WORKERS])
ax.legend(fontsize=8)
ax_ratio.plot(ks, [gap[k][1]["suboptimality"] / gap[k][0]["suboptimality"] for k in GAP_WORKERS], "o-")
ax_ratio.set(xscale="log", xlabel="workers K", ylabel="once / every", title="the gap grows with K")
ax_ratio.set_xticks(ks, [str(k) for k in GAP_WORKERS])
plt.tight_layout()
plt.show()
