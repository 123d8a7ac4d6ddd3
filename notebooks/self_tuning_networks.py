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
# # Self-Tuning Networks (MacKay et al., ICLR 2019) and Delta-STN in JAX
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/iclr19-optim-jax/iclr19-optim-jax/blob/main/notebooks/self_tuning_networks.ipynb)
#
# **The idea.** A hyperparameter $\lambda$ (weight decay, dropout, ...) is tuned *during* one training
# run. The network learns an approximation of its *best response* $w^\star(\lambda) =
# \arg\min_w L_\text{train}(w, \lambda)$: every best-response layer has general weights $W_g$ and
# response weights $W_r$, and its output is $W_g x + (V\lambda) \odot (W_r x)$, so one network covers a
# neighbourhood of hyperparameters. Training alternates
#
# * $T_\text{train}$ **weight steps** on training batches, each example at a perturbed hyperparameter
#   $\tilde u = u + \sigma\varepsilon$ (in an unconstrained space), so that the response learns how the
#   weights should move with $\lambda$, and
# * $T_\text{val}$ **hyper steps** on validation batches, regularisers off, which move $u$ (and the
#   perturbation scale $\sigma$, kept from collapsing by an entropy bonus) down the validation loss of
#   the *response* $w(\tilde u)$: the hypergradient flows through the response weights alone.
#
# Because $\lambda$ moves while the weights train, STN produces a hyperparameter **schedule**.
# Delta-STN (Bae & Grosse, 2020) centres the response on the current value and linearises the network
# in it (`jax.jvp`). Everything here is pure functions on `trainstep` steps, run in `lax.scan`.
#
# This notebook (1) tunes ridge regression's weight decay, where the best $\lambda^\star$ is known in
# closed form, and (2) runs STN on an MLP on MNIST-1D tuning six regularisers, and looks at the schedule.

# %%
import os
import sys

if "google.colab" in sys.modules:  # on Colab only; locally, `pip install -e .` from the repository
    # %pip install -q "git+https://github.com/iclr19-optim-jax/iclr19-optim-jax"
    print("installed trainstep and stn_jax")

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import trainstep
from stn_jax.baselines import FIXED_VALUES
from stn_jax.mlp import MLPSetup, load_data, mlp_space, train_fixed, train_stn
from stn_jax.ridge import RidgeConfig, init_ridge_params, make_ridge_stn
from trainstep.data import make_ridge_problem, ridge_optimal_lambda, ridge_validation_loss

# Sizes come from the environment so that CI can run this notebook small (TRAINSTEP_NB_STEPS=100).
STEPS = int(os.environ.get("TRAINSTEP_NB_STEPS", "3000"))  # ridge: STN cycles (5 weight + 1 hyper step)
FULL = STEPS >= 1000
MLP_STEPS = 2 * STEPS if FULL else 60  # MLP: weight steps of the STN run and of the plain run
print(f"ridge: {STEPS} cycles; MLP: {MLP_STEPS} weight steps")
print("devices:", jax.devices())

# %% [markdown]
# ## 1. Ridge regression: does STN find the closed-form $\lambda^\star$?
#
# Training loss $\frac1n\|Xw - y\|^2 + \lambda\|w\|^2$ on 50 examples in $d = 30$ with label noise,
# validation loss $\frac1m\|X_\text{val} w - y_\text{val}\|^2$ on 200 more. The exact ridge solution
# $w^\star(\lambda)$ gives the validation loss of every $\lambda$, so the optimum $\lambda^\star$ is found
# by a 1-D search (`ridge_optimal_lambda`). The STN's best response is $w(\lambda) = w_g + (v\log\lambda)
# w_r$ (`stn_jax.ridge.make_ridge_stn`), with $\log\lambda$ perturbed per batch.

# %%
problem = make_ridge_problem(seed=0)
p64 = type(problem)(*(np.asarray(a, np.float64) for a in problem))
lam_star, val_star = ridge_optimal_lambda(p64)
print(f"closed form: lambda* = {lam_star:.4f}, validation loss {val_star:.4f}")

config = RidgeConfig(method="stn", cycles=STEPS, init_weight_decay=1e-2)
stn = make_ridge_stn(config)
state = stn.init(init_ridge_params(problem.X_train.shape[1]))

# One cycle's batches: full-batch training data t_train times, validation data t_val times.
x, y, xv, yv = (jnp.asarray(a, jnp.float32) for a in problem)
cycle_batch = ((jnp.broadcast_to(x, (config.t_train, *x.shape)), jnp.broadcast_to(y, (config.t_train, *y.shape))),
               (jnp.broadcast_to(xv, (config.t_val, *xv.shape)), jnp.broadcast_to(yv, (config.t_val, *yv.shape))))
run = jax.jit(lambda s, k: trainstep.unroll(stn.cycle_step, s, None, key=k, num_steps=STEPS,
                                            batch_fn=lambda kk, t: cycle_batch))
state, metrics = run(state, jax.random.key(0))
lam_path = np.asarray(metrics["hp/weight_decay"])
lam = float(lam_path[-1])
regret = (ridge_validation_loss(p64, lam) - val_star) / val_star
print(f"STN: lambda = {lam:.4f}, log10(lambda/lambda*) = {np.log10(lam / lam_star):+.3f}, regret {regret:.2e}")

# %%
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
ax.plot(np.arange(1, STEPS + 1), lam_path, label="STN")
ax.axhline(lam_star, color="k", ls="--", label=r"$\lambda^\star$ (closed form)")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("cycle")
ax.set_ylabel(r"weight decay $\lambda$")
ax.legend()
ax.grid(alpha=0.3, which="both")
grid = np.logspace(-3, 2, 60)
ax2.plot(grid, [ridge_validation_loss(p64, g) for g in grid], color="0.4")
ax2.axvline(lam_star, color="k", ls="--")
ax2.axvline(lam, color="C0", label="STN's final value")
ax2.set_xscale("log")
ax2.set_xlabel(r"$\lambda$")
ax2.set_ylabel(r"validation loss of $w^\star(\lambda)$")
ax2.legend()
ax2.grid(alpha=0.3, which="both")
fig.tight_layout()
plt.show()

# %% [markdown]
# With the default size (3,000 cycles) STN lands within a few percent of $\lambda^\star$ in
# $\log_{10}$ and with a regret far below 1 %; `python -m stn_jax ridge --synthetic --method
# stn|delta-stn|unrolled` runs the same comparison from the shell, and the `stn_ridge` experiment over
# several seeds.
#
# ## 2. An MLP on MNIST-1D: six regularisers tuned in one run
#
# A 40-100-100-10 MLP with best-response layers; STN tunes input dropout, two hidden dropouts,
# Gaussian input noise, weight decay and the magnitude of a random-shift augmentation
# (`stn_jax.mlp.mlp_space`), starting from light regularisation everywhere. Dropout rates are
# per example (each example of a batch has its own perturbed rate), weight decay per batch. We compare
# with a plain network trained at STN's starting values (`train_fixed`) for the same number of steps.

# %%
setup = MLPSetup(steps=MLP_STEPS)
data = load_data(setup)
print({k: v for k, v in data.summary().items() if k != "name"})
stn_run = train_stn(setup, data, seed=0, warmup=MLP_STEPS // 12 if FULL else 0)  # no warm-up program in CI
plain = train_fixed(setup, data, FIXED_VALUES, seed=0)
for name, r in (("STN", stn_run), ("plain, fixed at STN's start", plain)):
    print(f"{name:>28}: validation loss {r['val_loss']:.4f}, test accuracy {100 * r['test_accuracy']:.1f} %, "
          f"wall {r['wall_s']:.1f} s (compilation included)")
print("STN's final values:", {k: round(v, 4) for k, v in stn_run["final_hparams"].items()})

# %%
names = mlp_space().names
fig, axes = plt.subplots(2, 3, figsize=(11, 5.4))
for ax, name in zip(axes.ravel(), names, strict=True):
    ax.plot(np.arange(setup.steps), stn_run["schedule"][name])
    ax.axhline(FIXED_VALUES[name], color="k", ls=":", lw=0.8)
    if name in ("input_noise", "weight_decay"):
        ax.set_yscale("log")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("weight step", fontsize=8)
    ax.grid(alpha=0.3, which="both")
fig.suptitle("STN's hyperparameter schedule (dotted: the starting value)", fontsize=10)
fig.tight_layout()
plt.show()

# %% [markdown]
# The hyperparameters move during training: a schedule, not a single value. Whether the schedule
# itself helps is what `python -m stn_jax schedule` measures (STN's schedule replayed from scratch
# against the best fixed value of a grid and against STN's final value held fixed), and
# `python -m stn_jax mlp` compares STN and Delta-STN with grid, random and optuna search in the same
# harness and budget accounting (`experiments/stn_mlp.py`, `experiments/stn_schedule.py`).
