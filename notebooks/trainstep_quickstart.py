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
# # `trainstep` quickstart: training and hypergradients in one `lax.scan`
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/iclr19-optim-jax/iclr19-optim-jax/blob/main/notebooks/trainstep_quickstart.ipynb)
#
# A training step is a pure function `step(state, batch, hparams, key) -> (state, metrics)`, and
# `trainstep.unroll` runs it for many steps inside one `lax.scan`. Hyperparameters are array
# arguments, never Python constants, so:
#
# 1. training is a single jitted call,
# 2. `jax.grad` through `unroll` gives hypergradients,
# 3. changing a hyperparameter does not recompile.

# %%
import os
import sys

if "google.colab" in sys.modules:  # on Colab only; locally, `pip install -e .` from the repository
    # %pip install -q "git+https://github.com/iclr19-optim-jax/iclr19-optim-jax"
    print("installed trainstep")

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax

import trainstep
from trainstep.data import make_ridge_problem, ridge_optimal_lambda
from trainstep.models import classification_loss, evaluate_classifier, make_classifier

# Sizes come from the environment so that CI can run this notebook small (TRAINSTEP_NB_STEPS=100).
STEPS = int(os.environ.get("TRAINSTEP_NB_STEPS", "2000"))
BATCH_SIZE = 128
print("training steps:", STEPS)
print("devices:", jax.devices())

# %% [markdown]
# ## 1. An MLP on MNIST-1D
#
# MNIST-1D is generated offline (4,000 train / 1,000 test sequences of length 40, 10 classes);
# `load_mnist1d` carves a stratified validation split out of the training set.

# %%
data = trainstep.load_mnist1d()
print(data.summary())

model = make_classifier("mlp", data.num_classes)  # two hidden layers of 100 ReLU units
params = model.init(jax.random.key(0), data.x_train[:1])

# `loss_fn(params, batch, hparams, key) -> (loss, {"accuracy": ...})`; the optimiser is a function
# of the (traced) hyperparameters, so the learning rate is an input of the compiled program.
train_step = trainstep.gradient_step(classification_loss(model.apply), lambda h: optax.adam(h["learning_rate"]))

# Minibatches are sampled inside jit from device-resident arrays, reshuffled every epoch.
batch_fn = trainstep.minibatch_fn((data.x_train, data.y_train), BATCH_SIZE, key=jax.random.key(1))


@jax.jit
def train(params, hparams, key):
    state = train_step.init(params, hparams)
    return trainstep.unroll(train_step, state, hparams, key=key, num_steps=STEPS, batch_fn=batch_fn)


state, metrics = train(params, {"learning_rate": 1e-3}, jax.random.key(2))
test = evaluate_classifier(model.apply, state.params, data.x_test, data.y_test)
print(f"after {int(state.step)} steps: test accuracy {float(test['accuracy']):.3f}, "
      f"test loss {float(test['loss']):.3f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(metrics["loss"], lw=0.8, alpha=0.5, label="minibatch loss")
window = max(1, STEPS // 50)
smooth = jnp.convolve(metrics["loss"], jnp.ones(window) / window, mode="valid")
ax.plot(jnp.arange(window - 1, STEPS), smooth, label=f"moving average ({window} steps)")
ax.set(xlabel="step", ylabel="training loss", yscale="log", title="MLP on MNIST-1D, Adam(1e-3)")
ax.legend()
plt.show()

# %% [markdown]
# ## 2. Changing hyperparameters does not recompile
#
# The learning rate is an argument of the jitted `train`, so a sweep reuses one compiled program.
# (`_cache_size()` is a private helper of jitted functions; it is skipped if this JAX lacks it.)

# %%
for lr in (3e-4, 3e-3):
    s, _ = train(params, {"learning_rate": lr}, jax.random.key(2))
    acc = evaluate_classifier(model.apply, s.params, data.x_test, data.y_test)["accuracy"]
    print(f"learning rate {lr:.0e}: test accuracy {float(acc):.3f}")

if hasattr(train, "_cache_size"):
    print("compiled versions of train:", train._cache_size())  # 1: three learning rates, one compilation
else:
    print("this JAX version has no jitted._cache_size(); skipping the recompilation check")

# %% [markdown]
# ## 3. Hypergradients: tuning ridge weight decay by gradient descent
#
# Linear regression with few training points and label noise, trained by full-batch gradient
# descent: every one of the `RIDGE_STEPS` steps sees the whole training set, so the stacked
# `batches` simply repeat it. `trainstep.hypergradient` differentiates the validation loss
# *after training* with respect to every hyperparameter; we descend on $\log\lambda$.
#
# `ridge_optimal_lambda` gives $\lambda^*$ for the *exact* ridge solution
# $\min_w \operatorname{mean}((Xw - y)^2) + \lambda |w|^2$; with enough gradient steps the unrolled
# solution approaches it, and so does the $\lambda$ found from hypergradients.

# %%
RIDGE_STEPS, HYPER_STEPS, HYPER_LR = 200, 15, 5.0

problem = make_ridge_problem()  # 50 training points, 200 validation points, 30 features
x_tr, y_tr = jnp.asarray(problem.X_train, jnp.float32), jnp.asarray(problem.y_train, jnp.float32)
x_val, y_val = jnp.asarray(problem.X_val, jnp.float32), jnp.asarray(problem.y_val, jnp.float32)


def ridge_loss(w, batch, hparams, key):
    x, y = batch
    return jnp.mean((x @ w - y) ** 2) + jnp.exp(hparams["log_l2"]) * (w @ w), {}


def val_fn(state):  # validation loss of the trained weights, no regulariser
    return jnp.mean((x_val @ state.params - y_val) ** 2)


ridge_step = trainstep.gradient_step(ridge_loss, lambda h: optax.sgd(h["learning_rate"]))
# Full-batch GD: the stacked batches (leading axis = step) repeat the training set.
full_batches = jax.tree.map(lambda a: jnp.broadcast_to(a, (RIDGE_STEPS, *a.shape)), (x_tr, y_tr))


@jax.jit
def val_and_hypergrad(hparams):
    state = ridge_step.init(jnp.zeros(x_tr.shape[1]), hparams)
    return trainstep.hypergradient(ridge_step, state, hparams, val_fn, key=jax.random.key(0), batches=full_batches)


hparams = {"learning_rate": jnp.float32(0.1), "log_l2": jnp.log(jnp.float32(0.1))}
for i in range(HYPER_STEPS):
    val, grads = val_and_hypergrad(hparams)  # grads has the structure of hparams
    if i % 3 == 0:
        print(f"step {i:2d}: lambda {float(jnp.exp(hparams['log_l2'])):.4f}  val loss {float(val):.4f}  "
              f"d val/d log(lambda) {float(grads['log_l2']):+.2e}  d val/d lr {float(grads['learning_rate']):+.2e}")
    hparams = {**hparams, "log_l2": hparams["log_l2"] - HYPER_LR * grads["log_l2"]}

lam_star, val_star = ridge_optimal_lambda(problem)
lam_found = float(jnp.exp(hparams["log_l2"]))
print(f"lambda found by hypergradient descent: {lam_found:.4f}  (val loss {float(val_and_hypergrad(hparams)[0]):.4f})")
print(f"lambda* of the exact ridge solution:  {lam_star:.4f}  (val loss {val_star:.4f})")
