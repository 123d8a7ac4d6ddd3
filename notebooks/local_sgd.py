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
# # Local SGD converges fast and communicates little (Stich, ICLR 2019)
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/iclr19-optim-jax/iclr19-optim-jax/blob/main/notebooks/local_sgd.ipynb)
#
# **Local SGD.** $K$ workers each run SGD (minibatch $b$) on their own stream of samples and average
# their parameters every $H$ steps; in between they do not communicate. With $H = 1$ this is
# mini-batch SGD with batch $K b$; with $H = T$ it is one-shot averaging.
#
# **Stich's result.** For an $L$-smooth, $\mu$-strongly convex $f$, with step size
# $\eta_t = 4 / (\mu (a + t))$, a shift $a > \max(16\kappa, H)$ ($\kappa = L/\mu$), and the output
# $\hat x_T$ the average of all workers' iterates with weights $w_t = (a + t)^2$,
#
# $$\mathbb E f(\hat x_T) - f^\star = O\!\left(\frac{\sigma^2}{\mu b K T} + \frac{\kappa G^2 H^2}{\mu T^2}\right)
# + \text{higher-order terms}.$$
#
# The first term is the mini-batch rate, with a **linear speed-up in $K$**. It dominates while
# $H = O(\sqrt{T / (K b)})$, so the number of communications $T / H$ can drop from $T$ to about
# $\sqrt{T K b}$ at no cost in rate.
#
# This notebook checks it on L2-regularised logistic regression with a known optimum, first through
# `comm_sgd.logreg.run_logreg` (the experiment driver), then with the building blocks: a
# `trainstep.gradient_step`, `comm_sgd.parallel_local_sgd` and `trainstep.unroll`, simulated with
# `vmap` on one device or run with `shard_map` on a device mesh.

# %%
import os
import sys

if "google.colab" in sys.modules:  # on Colab only; locally, `pip install -e .` from the repository
    # %pip install -q "git+https://github.com/iclr19-optim-jax/iclr19-optim-jax"
    print("installed trainstep and comm_sgd")

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import comm_sgd
import trainstep
from comm_sgd.logreg import LogregConfig, run_logreg, synthetic_problem

# Sizes come from the environment so that CI can run this notebook small (TRAINSTEP_NB_STEPS=100).
STEPS = int(os.environ.get("TRAINSTEP_NB_STEPS", "4000"))  # T, local steps per worker
FULL = STEPS >= 1000
SEEDS = 20 if FULL else 2  # independent runs, vectorised; results are means over seeds
WORKERS = [1, 2, 4, 8, 16] if FULL else [1, 4, 16]
H_MID = max(2, int(np.sqrt(STEPS / max(WORKERS))))  # <= sqrt(T/K) for every K in the grid
PERIODS = [1, H_MID, 8 * H_MID] if FULL else [1, H_MID]
print(f"T = {STEPS} steps, {SEEDS} seeds, K in {WORKERS}, H in {PERIODS}")
print("devices:", jax.devices())

# %% [markdown]
# ## 1. The problem
#
# `synthetic_problem(n, d, scale, l2)` draws $n$ Gaussian feature vectors in $\mathbb R^d$ (scale
# `scale`), labels from a random true direction with 5 % flipped, and solves for the optimum
# $w^\star$ by Newton's method in float64, so the suboptimality $f(\hat w) - f^\star$ is exact. The
# regulariser `l2` is also the strong-convexity constant $\mu$.

# %%
problem = synthetic_problem(4096, 20, 3.0, 1e-2)
n, d = problem.X.shape
print(f"{problem.name}: n = {n}, d = {d}, mu = {problem.l2:g}, L = {problem.smoothness:.4f}, "
      f"kappa = {problem.condition_number:.1f}, f* = {problem.f_star:.6f}")
a = comm_sgd.stich_shift(problem.condition_number, 1)  # max(16 kappa, H) + 1
eta_0, eta_T = 4 / (problem.l2 * a), 4 / (problem.l2 * (a + STEPS))
print(f"Stich's shift a = {a:.1f}: step sizes 4 / (mu (a + t)) from {eta_0:.3f} (t = 0) to {eta_T:.3f} (t = T); "
      f"L * eta_0 = {problem.smoothness * eta_0:.2f}")

# %% [markdown]
# ## 2. Speed-up against the number of workers
#
# `run_logreg` runs `seeds` independent runs at once (a `vmap` over seeds around the workers'
# `vmap`) and returns the suboptimality of the output iterate, per seed and averaged, together with
# the number of communications (averaging rounds). `lr="stich"` and `average="stich"` select the
# step size and the weighted output average of the theorem; batch $b = 1$.


# %%
def schedule_for(period):
    return "every" if period == 1 else f"fixed:{period}"


results = {}
for period in PERIODS:
    for k in WORKERS:
        same_shift = comm_sgd.stich_shift(problem.condition_number, period) == comm_sgd.stich_shift(
            problem.condition_number, 1)
        if k == 1 and period > 1 and same_shift:
            # One worker has nothing to average: every H is plain SGD (same keys, same step sizes).
            results[period, k] = results[1, k]
            continue
        config = LogregConfig(workers=k, steps=STEPS, seeds=SEEDS, schedule=schedule_for(period),
                              lr="stich", average="stich")
        r = run_logreg(problem, config, progress=False)
        # The counter in the workers' state agrees with the schedule (run_logreg checks it too).
        assert r["communications"] == comm_sgd.parse_schedule(config.schedule).num_communications(STEPS)
        results[period, k] = r
        sem = np.std(r["suboptimality_per_seed"]) / np.sqrt(SEEDS)
        print(f"H = {period:4d}  K = {k:2d}  communications {r['communications']:5d}  "
              f"suboptimality {r['suboptimality']:.3e} +- {sem:.1e}")

# %%
ks = np.array(WORKERS, float)
k_max = max(WORKERS)
fig, ax = plt.subplots(figsize=(6, 4))
slopes = {}
for period in PERIODS:
    sub = np.array([results[period, k]["suboptimality"] for k in WORKERS])
    sem = np.array([np.std(results[period, k]["suboptimality_per_seed"]) / np.sqrt(SEEDS) for k in WORKERS])
    slopes[period] = np.polyfit(np.log(ks), np.log(sub), 1)[0]
    ax.errorbar(ks, sub, yerr=sem, marker="o", capsize=3,
                label=f"H = {period} ({results[period, k_max]['communications']} communications), "
                      f"slope {slopes[period]:.2f}")
first = results[1, WORKERS[0]]["suboptimality"]
ax.plot(ks, first * ks[0] / ks, "k:", label="slope -1 (linear speed-up)")
ax.set(xscale="log", yscale="log", xlabel="workers K", ylabel=r"$f(\hat w_T) - f^\star$",
       title=f"Local SGD on logistic regression, T = {STEPS}")
ax.set_xticks(ks, [str(k) for k in WORKERS])
ax.legend(fontsize=8)
plt.show()

for period in PERIODS:
    ok = [k for k in WORKERS if period <= np.sqrt(STEPS / k)]
    print(f"H = {period:4d}: fitted slope {slopes[period]:+.2f}; H <= sqrt(T/K) for K in {ok}")

# %% [markdown]
# For $H \le \sqrt{T/K}$ the error falls like $1/K$ (slope near $-1$): averaging every $H$ steps is
# as good as averaging every step. Past that bound the $H^2/T^2$ term shows up and the speed-up
# flattens.
#
# ## 3. What communicating less costs
#
# The same comparison at the largest $K$, as a ratio to mini-batch SGD ($H = 1$):

# %%
base = results[1, k_max]
for period in PERIODS:
    r = results[period, k_max]
    print(f"K = {k_max}, H = {period:4d}: {r['communications']:5d} communications "
          f"({r['bytes_all_reduced'] / 1024:8.1f} KiB all-reduced per worker), "
          f"suboptimality {r['suboptimality']:.3e} = {r['suboptimality'] / base['suboptimality']:.2f} x mini-batch")

# %% [markdown]
# ## 4. The building blocks
#
# `run_logreg` is a thin driver. Local SGD itself wraps *any* `trainstep` step:
#
# * `trainstep.gradient_step(loss, optax.sgd(schedule))` is one worker's SGD step;
# * `comm_sgd.parallel_local_sgd(step, num_workers=K, worker_batch_fn=..., mesh=None)` runs $K$ copies
#   of it (stacked states, leading axis $K$) and averages them over a named axis with `lax.pmean`
#   when told to; each worker draws its own minibatch with `worker_batch_fn(key, t, worker)`;
# * the schedule arrives with the batch: `comm_sgd.schedule_batch_fn(mask)` gives step $t$ the flag
#   `mask[t]`, so `trainstep.unroll` runs the whole thing in one `lax.scan`.

# %%
X = jnp.asarray(problem.X, jnp.float32)
Y = jnp.asarray(problem.y, jnp.float32)


def loss_fn(w, batch, hparams, key):
    x, y = batch
    return jnp.mean(jnp.logaddexp(0.0, -y * (x @ w))) + 0.5 * problem.l2 * (w @ w)


def worker_batch_fn(key, t, worker):
    """iid sampling: every worker draws one example from the whole data set (ignores `worker`)."""
    idx = jax.random.randint(key, (1,), 0, n)
    return X[idx], Y[idx]


shift = comm_sgd.stich_shift(problem.condition_number, H_MID)
sgd = trainstep.gradient_step(loss_fn, optax.sgd(comm_sgd.stich_step_size(problem.l2, shift)), has_aux=False)
mask = comm_sgd.fixed(H_MID).mask(STEPS)  # mask[t]: average after step t


def run_local_sgd(num_workers, mesh=None, seed=0):
    local = comm_sgd.parallel_local_sgd(sgd, num_workers=num_workers, worker_batch_fn=worker_batch_fn, mesh=mesh,
                                        average="stich", average_shift=shift)
    states = local.init(sgd.init(jnp.zeros(d, jnp.float32)))  # K copies of one worker's state
    run = jax.jit(lambda s: trainstep.unroll(local, s, None, key=jax.random.key(seed), num_steps=STEPS,
                                             batch_fn=comm_sgd.schedule_batch_fn(mask)))
    return run(states)


k_demo = 4  # in both the CI and the full grid
states, metrics = run_local_sgd(k_demo)
w_out = np.asarray(comm_sgd.worker_output(states), np.float64)  # mean over workers of their averaged iterates
print("metrics:", {name: value.shape for name, value in metrics.items()}, "(steps, workers)")
print("communications per worker:", np.asarray(states.communications), "expected", int(mask.sum()))
assert np.all(np.asarray(states.communications) == mask.sum())
assert np.array_equal(np.asarray(metrics["synced"][:, 0]), mask)
print(f"K = {k_demo}, H = {H_MID}, one seed: suboptimality {problem.suboptimality(w_out):.3e} "
      f"(run_logreg's mean over {SEEDS} seeds: {results[H_MID, k_demo]['suboptimality']:.3e})")

# %% [markdown]
# ## 5. Real workers: `shard_map` over a device mesh
#
# With `mesh=comm_sgd.worker_mesh(K)` the same per-worker step runs under `jax.shard_map`, $K / D$
# workers on each of the $D$ devices, and the averages are real all-reduces. Worker $w$ sees the same
# random keys in both backends, so with one worker per device the run equals the `vmap` simulation
# (on CPU the parameters are bit-identical; the separately compiled running averages can differ in
# the last bits).
# A Colab TPU has 8 cores; on a machine with one device this part is skipped. (On CPU you can
# simulate devices by setting `XLA_FLAGS=--xla_force_host_platform_device_count=8` before importing
# JAX.)

# %%
num_devices = jax.device_count()
if num_devices > 1:
    mesh = comm_sgd.worker_mesh(num_devices)
    sim_states, _ = run_local_sgd(num_devices)
    real_states, _ = run_local_sgd(num_devices, mesh=mesh)
    print("worker parameters sharded as", real_states.inner.params.sharding)
    # The workers' parameters (stacked, K x d) and their running weighted averages.
    sim_params, real_params = comm_sgd.fetch(comm_sgd.worker_params(sim_states)), comm_sgd.fetch(
        comm_sgd.worker_params(real_states))
    sim_avg, real_avg = comm_sgd.fetch(sim_states.average.params), comm_sgd.fetch(real_states.average.params)
    diff_params = float(np.max(np.abs(real_params - sim_params)))
    diff_avg = float(np.max(np.abs(real_avg - sim_avg)))
    print(f"{num_devices} workers, one per device, max |shard_map - vmap|: "
          f"parameters {diff_params:.1e}, averaged iterates {diff_avg:.1e}")
    sim_w, real_w = sim_avg.astype(np.float64).mean(axis=0), real_avg.astype(np.float64).mean(axis=0)
    print(f"suboptimality: vmap {problem.suboptimality(sim_w):.6e}, shard_map {problem.suboptimality(real_w):.6e}")
    assert np.all(comm_sgd.fetch(real_states.communications) == mask.sum())
    # 0 for the parameters on CPU (same keys, same samples, same averages); the compiled running
    # average may round differently, and accelerators may too: compare with a tolerance.
    assert max(diff_params, diff_avg) <= 1e-3 * float(np.max(np.abs(sim_avg)))
else:
    print("one device: skipping the shard_map run (a Colab TPU has 8 devices)")
