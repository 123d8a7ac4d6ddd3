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
# # Meta-learned unsupervised update rules (Metz et al., ICLR 2019)
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/iclr19-optim-jax/iclr19-optim-jax/blob/main/notebooks/meta_learned_rules.ipynb)
#
# **The idea.** Instead of choosing an unsupervised objective (reconstruction, contrast, ...) and
# following its gradient, *learn the update rule itself*: a small network θ, shared by every neuron
# of every layer, looks at each neuron's pre- and post-activations, a top-down signal sent down
# through separate backward weights $V$, and statistics of the minibatch, and emits per-example
# vectors whose outer products are the weight updates $\Delta W$, $\Delta V$, $\Delta b$. It never
# sees a label and never computes a gradient of the base model, so it can train networks that
# back-propagation cannot (here: a step activation).
#
# **The meta-objective.** θ is meta-trained so that the representation the rule produces is good for
# *few-shot* classification: a ridge readout is fitted in closed form on a few labelled examples per
# class and scored on others (cosine distance), averaged along the rule's trajectory. The labels reach
# only this readout.
#
# **Here.** The rule is a `trainstep` step whose `hparams` are θ (`meta_rules.make_rule_step`), an
# episode of it is *what is unrolled* (`make_meta_unroll`), truncated back-propagation, antithetic ES
# and PES are *how its gradient is estimated* (`make_estimator`), and Adam with clipping is *how θ is
# updated* (`make_meta_train_step`). We meta-train briefly on digits-derived and synthetic tasks,
# evaluate on held-out MNIST-1D against random initialisation, and train a step-activation network.

# %%
import os
import sys

if "google.colab" in sys.modules:  # on Colab only; locally, `pip install -e .` from the repository
    # %pip install -q "git+https://github.com/iclr19-optim-jax/iclr19-optim-jax"
    print("installed trainstep and meta_rules")

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import meta_rules as mr
import trainstep

# Sizes come from the environment so that CI can run this notebook small (TRAINSTEP_NB_STEPS=100).
STEPS = int(os.environ.get("TRAINSTEP_NB_STEPS", "300"))  # meta-training steps
FULL = STEPS >= 300
WIDTH, DEPTH = (32, 2) if FULL else (16, 1)  # base MLP hidden layers
RULE_CONFIG = mr.RuleConfig(hidden=16, channels=4) if FULL else mr.RuleConfig(hidden=8, channels=2)
TASK_CONFIG = mr.TaskConfig(num_classes=5, shots=10, queries=10, unlabelled=32)
TASKS = 8 if FULL else 4  # vmapped tasks per meta-step
INNER = 200 if FULL else 20  # inner steps when evaluating a rule
print(f"{STEPS} meta-steps on {TASKS} tasks each; base MLP {WIDTH} x {DEPTH}; rule {RULE_CONFIG}")
print("devices:", jax.devices())

# %% [markdown]
# ## 1. A rule is a training step
#
# `init_theta` draws θ; `make_rule_step` returns a `trainstep.TrainStep` whose `step(state, x, θ, key)`
# takes one *unlabelled* minibatch. `trainstep.unroll` runs it in a `lax.scan`, exactly as it runs
# gradient descent. The updates are normalised per receptive field and applied with a bounded step
# size $\eta_{\max}\,\sigma(\theta_{\text{step}})$, so even a random θ moves the weights by a controlled
# amount.

# %%
# (the library's functions are not jitted: jit what you call, here even the samplers, which run faster compiled)
theta0 = jax.jit(lambda k: mr.init_theta(k, RULE_CONFIG))(jax.random.key(0))
rule = mr.make_rule_step(RULE_CONFIG, activation="relu")
task = jax.jit(mr.digits_task_fn(TASK_CONFIG))(jax.random.key(1))  # 5 classes of digits, augmented, standardised
params = jax.jit(lambda k: mr.init_base_mlp(k, (64,) + (WIDTH,) * DEPTH))(jax.random.key(2))
batch_fn = trainstep.minibatch_fn(task.x_unlabelled, 32, mode="iid")

state, metrics = jax.jit(lambda th: trainstep.unroll(rule, rule.init(params), th, key=jax.random.key(3),
                                                     num_steps=10, batch_fn=batch_fn))(theta0)
print("θ leaves:", jax.tree.map(jnp.shape, theta0))
print("update RMS per step:", np.round(np.asarray(metrics["update_rms"]), 4))
print("step sizes (W, V, b):", np.round(np.asarray(mr.rule.step_sizes(theta0, RULE_CONFIG)), 4))

# %% [markdown]
# ## 2. Meta-training
#
# Each meta-step draws nothing new by itself: a batch of `TASKS` *episodes* is in progress (a task, a
# fresh base network, a total length $T$ sampled per episode). The estimator runs one truncation of
# $K$ rule steps on each (vmapped), differentiates the mean readout loss with respect to θ, and the
# outer Adam step updates θ; an episode that reaches its length restarts on a new task. The whole
# outer loop is itself a `TrainStep`, so `meta_train` runs chunks of it in one `lax.scan`.

# %%
unroll_config = mr.UnrollConfig(sizes=(64,) + (WIDTH,) * DEPTH, activation="relu", batch_size=32,
                                truncation=(5, 10) if FULL else (5, 5), length=(50, 200) if FULL else (20, 40))
meta_unroll = mr.make_meta_unroll(mr.meta_train_task_fn(TASK_CONFIG), TASK_CONFIG.num_classes, unroll_config,
                                  RULE_CONFIG)
estimator = mr.make_estimator(meta_unroll, "tbptt")  # or "es", "pes" (no derivative of the inner loop)
meta_step = mr.make_meta_train_step(estimator, mr.meta_optimizer(3e-3, clip_norm=1.0))
meta_state = jax.jit(lambda th, k: meta_step.init(th, k, TASKS))(theta0, jax.random.key(4))
meta_state, history = mr.meta_train(meta_step, meta_state, key=jax.random.key(5), num_steps=STEPS,
                                    chunk=max(1, STEPS // 4))  # four compiled chunks of one lax.scan each
theta = meta_state.theta

loss = history["loss"]
window = max(1, STEPS // 20)
smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(loss, alpha=0.3, label="per meta-step")
ax.plot(np.arange(window - 1, STEPS), smooth, label=f"mean of {window}")
ax.set(xlabel="meta-step", ylabel="truncation meta-loss (cosine readout)", title="Meta-training")
ax.legend()
plt.show()
tenth = max(1, STEPS // 10)
print(f"meta-loss: first tenth {loss[:tenth].mean():.4f}, last tenth {loss[-tenth:].mean():.4f}; "
      f"episodes finished per step {history['done'].mean():.2f}")

# %% [markdown]
# ## 3. Held-out evaluation on MNIST-1D
#
# MNIST-1D (40 features) never appears in meta-training. `evaluate_rule` samples fresh 5-way tasks from
# its test split, a fresh base network for each, runs the rule for `INNER` steps on the task's
# unlabelled examples and scores the 10-shot ridge readout along the way; step 0 is the random
# initialisation. The rule was meta-trained on 64-feature inputs and applies as it is to 40.

# %%
mnist1d = mr.mnist1d_task_fn(TASK_CONFIG)
eval_config = mr.UnrollConfig(sizes=(40,) + (WIDTH,) * DEPTH, activation="relu", batch_size=32)
evaluate = jax.jit(lambda th: mr.evaluate_rule(th, mnist1d, TASK_CONFIG.num_classes, key=jax.random.key(6),
                                               num_tasks=32 if FULL else 8, num_steps=INNER, config=eval_config,
                                               rule_config=RULE_CONFIG, eval_every=max(1, INNER // 10)))
curves = {"meta-trained rule": evaluate(theta), "initial (random) θ": evaluate(theta0)}

fig, ax = plt.subplots(figsize=(6, 3.5))
for name, out in curves.items():
    acc = np.asarray(out["accuracy"])
    sem = acc.std(axis=0) / np.sqrt(acc.shape[0])
    ax.errorbar(np.asarray(out["step"]), acc.mean(axis=0), yerr=sem, marker="o", capsize=3, label=name)
ax.axhline(1 / TASK_CONFIG.num_classes, color="k", ls=":", label="chance")
ax.set(xlabel="inner steps of the rule", ylabel="10-shot ridge accuracy", title="Held-out MNIST-1D (5-way)")
ax.legend()
plt.show()
for name, out in curves.items():
    acc = np.asarray(out["accuracy"])
    print(f"{name:20s}: random init {acc[:, 0].mean():.3f} -> after {INNER} steps {acc[:, -1].mean():.3f} "
          f"(± {acc[:, -1].std() / np.sqrt(acc.shape[0]):.3f})")

# %% [markdown]
# A short CPU meta-training run only moves θ a little; the experiment (`python -m meta_rules
# meta-train`, then `evaluate`) runs longer and compares against an autoencoder, PCA and the raw input
# over many seeds and episodes (`meta_rules.evaluate`).
#
# ## 4. A network back-propagation cannot train
#
# With a step activation $h = [z > 0]$ every derivative through the network is zero, so the gradient of
# any loss with respect to its weights vanishes. The rule does not differentiate the base model, so
# it trains the step network all the same (here, the rule meta-trained with ReLU networks).

# %%
task1d = jax.jit(mnist1d)(jax.random.key(7))
step_params = jax.jit(lambda k: mr.init_base_mlp(k, (40,) + (WIDTH,) * DEPTH))(jax.random.key(8))


def readout(p):
    return mr.task_readout_loss(p, task1d, num_classes=TASK_CONFIG.num_classes, activation="step")


grads = jax.jit(jax.grad(lambda p: readout(p)[0]))(step_params)
print("largest |∂ readout loss / ∂ weight| through the step network:",
      max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads)))

trained, step_metrics = jax.jit(lambda th, p: mr.apply_rule(th, p, task1d.x_unlabelled, num_steps=INNER,
                                                            key=jax.random.key(9), config=RULE_CONFIG,
                                                            activation="step"))(theta, step_params)
change = max(float(jnp.max(jnp.abs(a["w"] - b["w"]))) for a, b in zip(trained, step_params, strict=True))
print(f"after {INNER} rule steps the largest weight change is {change:.3f}; "
      f"10-shot accuracy {float(jax.jit(readout)(step_params)[1]):.3f} -> {float(jax.jit(readout)(trained)[1]):.3f} "
      "(one task)")
