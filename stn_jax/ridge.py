"""Ridge regression with a tuned weight decay: the problem where the answer is known.

Training loss ``mean((X w - y)^2) + lam |w|^2``, validation loss ``mean((X_val w - y_val)^2)``;
the exact ridge solution gives the validation loss of every ``lam`` and so the optimum ``lam*``
(:func:`trainstep.data.ridge_optimal_lambda`). Three ways to tune ``lam``:

* ``stn``: a Self-Tuning Network whose best response is ``w(lam) = w_g + (h . v) w_r``, with
  ``h = log lam`` (the unconstrained hyperparameter) and the parameters named
  ``{"general": {"w"}, "response": {"w", "v"}}``, trained by :func:`stn_jax.make_stn`'s
  alternating cycle (weight decay perturbed once per batch);
* ``delta-stn``: the same with Delta-STN's centred response ``h = log lam~ - log lam``;
* ``unrolled``: gradient descent (Adam) on ``log lam`` with the exact hypergradient
  (:func:`trainstep.hypergradient`) through ``K`` steps of full-batch gradient descent on the
  training loss, warm-started from the previous outer step (truncated backpropagation: once the
  inner weights have converged the truncated hypergradient is the implicit one up to a factor
  ``1 - (1 - eta mu)^K``).

All run through :func:`trainstep.runner.run_chunked` (checkpoints, resume, non-finite checks), one
runner step per STN cycle or per outer step, and record the weight-decay schedule.

Example:
  >>> problem = make_ridge_problem(seed=0)
  >>> res = run_ridge(problem, RidgeConfig(method="stn"), out_dir=None, progress=False)
  >>> res["weight_decay"], res["weight_decay_closed_form"], res["regret"]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stn_jax.hparams import HParam, HParamSpace
from stn_jax.stn import STN, STNConfig, make_stn
from trainstep.core import TrainState, TrainStep, gradient_step, unroll
from trainstep.data import (
    DataError,
    RidgeProblem,
    check_features,
    load_npz,
    ridge_optimal_lambda,
    ridge_validation_loss,
)
from trainstep.hypergrad import hypergradient
from trainstep.runner import ConfigError, run_chunked

METHODS = ("stn", "delta-stn", "unrolled")
NPZ_KEYS = ("X_train", "y_train", "X_val", "y_val")
DEFAULT_CYCLES = {"stn": 3000, "delta-stn": 3000, "unrolled": 300}
SCHEDULE_POINTS = 200


# ---------------------------------------------------------------------------------------------
# Data


def _check_targets(y: np.ndarray, n: int, *, source: str, key: str, features_key: str) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype == object or not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise DataError(f"{source}: key '{key}': expected a numeric array, got dtype {y.dtype}")
    if y.ndim != 1:
        raise DataError(f"{source}: key '{key}': expected a 1-D array of targets, got shape {y.shape}")
    if len(y) != n:
        raise DataError(f"{source}: key '{key}': has {len(y)} targets but '{features_key}' has {n} rows")
    bad = ~np.isfinite(y)
    if bad.any():
        raise DataError(f"{source}: key '{key}': {int(bad.sum())} non-finite values (NaN or inf), "
                        f"first at index {int(np.argmax(bad))}")
    return y.astype(np.float32)


def load_ridge_npz(path: str) -> RidgeProblem:
    """Loads and validates a ridge problem from an ``.npz`` with keys ``X_train``, ``y_train``,
    ``X_val``, ``y_val``: 2-D finite features with the same number of columns in both splits,
    1-D finite targets as long as their features.

    Raises:
      DataError: naming the file and the key at fault.
    """
    arrays = load_npz(path, NPZ_KEYS)
    source = str(path)
    out = {}
    for split in ("train", "val"):
        xk, yk = f"X_{split}", f"y_{split}"
        x = check_features(arrays[xk], source=source, key=xk)
        out[xk] = x
        out[yk] = _check_targets(arrays[yk], x.shape[0], source=source, key=yk, features_key=xk)
    d_train, d_val = out["X_train"].shape[1], out["X_val"].shape[1]
    if d_train < 1:
        raise DataError(f"{source}: key 'X_train': has no columns (features)")
    if d_val != d_train:
        raise DataError(f"{source}: key 'X_val': has {d_val} columns but 'X_train' has {d_train}")
    return RidgeProblem(out["X_train"], out["y_train"], out["X_val"], out["y_val"])


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class RidgeConfig:
    """How the weight decay is tuned.

    Attributes:
      method: ``stn``, ``delta-stn`` or ``unrolled``.
      cycles: runner steps: STN cycles (``t_train`` weight steps then ``t_val`` hyper steps) or
        outer steps of ``unrolled``; ``None`` takes the method's default.
      warmup: weight steps before the first cycle (STN only).
      t_train, t_val: weight and hyper steps per STN cycle.
      lr: Adam step size of the STN weights.
      hyper_lr: Adam step size of ``log lam`` (all methods).
      init_weight_decay: the starting ``lam``.
      init_scale: initial perturbation scale ``sigma`` of ``log lam`` (STN).
      entropy_weight: ``tau``, the weight of the perturbation's entropy (STN).
      inner_steps: ``K``, gradient-descent steps per outer step of ``unrolled``.
      seed: seed of the run (perturbations).
    """

    method: str = "stn"
    cycles: Optional[int] = None
    warmup: int = 0
    t_train: int = 5
    t_val: int = 1
    lr: float = 1e-2
    hyper_lr: float = 3e-2
    init_weight_decay: float = 1e-2
    init_scale: float = 0.5
    entropy_weight: float = 1e-3
    inner_steps: int = 50
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.cycles is None:
            object.__setattr__(self, "cycles", DEFAULT_CYCLES[self.method])
        for name in ("cycles", "t_train", "t_val", "inner_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        for name in ("lr", "hyper_lr", "init_weight_decay", "init_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be finite and > 0, got {v}")
        if not (math.isfinite(self.entropy_weight) and self.entropy_weight >= 0):
            raise ConfigError(f"entropy_weight must be finite and >= 0, got {self.entropy_weight}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# STN and Delta-STN


def best_response_weights(params: dict, h: jax.Array) -> jax.Array:
    """``w(h) = w_g + (h . v) w_r`` per example: ``h (B, 1) -> (B, d)``."""
    scale = h @ params["response"]["v"]
    return params["general"]["w"][None, :] + scale[:, None] * params["response"]["w"][None, :]


def ridge_predict(params, x, h, hvals, key, train):
    """The STN's ``predict``: ``x_i . w(h_i)``."""
    del hvals, key, train
    return jnp.sum(x * best_response_weights(params, h), axis=1)


def squared_error(out: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.square(out - y)


def weight_decay_penalty(params, h, hvals) -> jax.Array:
    """``mean_i lam_i |w(h_i)|^2`` (one shared ``lam`` per batch here: weight decay is declared so)."""
    w = best_response_weights(params, h)
    return jnp.mean(hvals["weight_decay"] * jnp.sum(jnp.square(w), axis=1))


def init_ridge_params(d: int) -> dict:
    """``w_g = w_r = 0``, ``v = 1``: the response starts flat and learns its slope."""
    return {"general": {"w": jnp.zeros((d,), jnp.float32)},
            "response": {"w": jnp.zeros((d,), jnp.float32), "v": jnp.ones((1,), jnp.float32)}}


def make_ridge_stn(config: RidgeConfig) -> STN:
    """The STN (or Delta-STN) of the ridge problem with one hyperparameter, ``weight_decay``."""
    space = HParamSpace([HParam("weight_decay", init=config.init_weight_decay, constraint="log",
                                perturb="batch", init_scale=config.init_scale)])
    stn_config = STNConfig(t_train=config.t_train, t_val=config.t_val, entropy_weight=config.entropy_weight,
                           tune_scales=True, delta=config.method == "delta-stn")
    return make_stn(space, ridge_predict, squared_error, penalty=weight_decay_penalty,
                    weight_optimizer=optax.adam(config.lr), hyper_optimizer=optax.adam(config.hyper_lr),
                    config=stn_config)


# ---------------------------------------------------------------------------------------------
# Unrolled hypergradient


class UnrolledState(NamedTuple):
    """The inner weights (warm-started across outer steps) and ``{"log_weight_decay"}``."""

    inner: TrainState
    outer: TrainState


def _train_loss(w, batch, hparams, key):
    del key
    x, y = batch
    return jnp.mean(jnp.square(x @ w - y)) + jnp.exp(hparams["log_weight_decay"]) * jnp.sum(jnp.square(w))


def make_unrolled_step(gram_max_eig: float, config: RidgeConfig) -> TrainStep:
    """One outer step of the unrolled method: the hypergradient of the validation loss after ``K``
    inner steps from the current weights, an Adam step on ``log lam``, then ``K`` inner steps at the
    new ``lam`` (the next warm start).

    The inner step size is ``1 / L`` with ``L = 2 (gram_max_eig + lam)`` the smoothness of the
    training loss (``gram_max_eig`` is the largest eigenvalue of ``X^T X / n``); it depends on
    ``lam`` but carries no gradient, so the hypergradient is that of plain gradient descent.

    The runner's batch is ``((X_train, y_train), (X_val, y_val))``.
    """
    def inner_lr(hparams):
        lam = jax.lax.stop_gradient(jnp.exp(hparams["log_weight_decay"]))
        return 1.0 / (2.0 * (gram_max_eig + lam))

    inner = gradient_step(_train_loss, lambda h: optax.sgd(inner_lr(h)), has_aux=False)
    outer_tx = optax.adam(config.hyper_lr)
    k_steps = config.inner_steps

    def init(w0, log_weight_decay) -> UnrolledState:
        hp = {"log_weight_decay": jnp.asarray(log_weight_decay, jnp.float32)}
        return UnrolledState(inner.init(w0, hp), TrainState(jnp.zeros((), jnp.int32), hp, outer_tx.init(hp)))

    def step(state: UnrolledState, batch, hparams, key):
        del hparams
        train, (x_val, y_val) = batch

        def train_batch(k, t):
            return train

        def val_fn(s):
            return jnp.mean(jnp.square(x_val @ s.params - y_val))

        val, grads = hypergradient(inner, state.inner, state.outer.params, val_fn, key=key, num_steps=k_steps,
                                   batch_fn=train_batch)
        updates, opt_state = outer_tx.update(grads, state.outer.opt_state, state.outer.params)
        hp = optax.apply_updates(state.outer.params, updates)
        inner_state, _ = unroll(inner, state.inner, hp, key=key, num_steps=k_steps, batch_fn=train_batch)
        outer = TrainState(state.outer.step + 1, hp, opt_state)
        lam = jnp.exp(hp["log_weight_decay"])
        return UnrolledState(inner_state, outer), {"loss": val, "val_loss": val, "hp/weight_decay": lam,
                                                    "hypergradient": grads["log_weight_decay"]}

    return TrainStep(init, step)


# ---------------------------------------------------------------------------------------------
# The run


def _schedule(values: np.ndarray, max_points: int = SCHEDULE_POINTS) -> dict:
    """Values at up to ``max_points`` cycles, evenly spaced, always including the last."""
    n = len(values)
    idx = np.unique(np.round(np.linspace(0, n - 1, min(n, max_points))).astype(int))
    return {"cycle": (idx + 1).tolist(), "weight_decay": np.asarray(values)[idx].astype(float).tolist()}


def run_ridge(problem: RidgeProblem, config: RidgeConfig, *, out_dir: Optional[str] = None,
              run_config: Optional[dict] = None, chunk_size: Optional[int] = None, progress: bool = True,
              desc: Optional[str] = None) -> dict[str, Any]:
    """Tunes the weight decay of ``problem`` by ``config.method`` and scores it against the closed form.

    Args:
      problem: train and validation arrays.
      config: the method and its settings.
      out_dir: checkpoints folder of the runner (``None``: no checkpoints); ``results.json`` is
        not written here (see :func:`stn_jax.cli.main`).
      run_config: what the runner records as the run's configuration (default: ``config``).
      chunk_size, progress, desc: as in :func:`trainstep.runner.run_chunked`.

    Returns:
      ``weight_decay`` (tuned), ``val_loss`` (closed-form ridge solution at it),
      ``val_loss_model`` (the method's own weights), ``weight_decay_closed_form`` and
      ``val_loss_closed_form`` (the optimum), ``regret`` ``(val_loss - val*) / val*``,
      ``log10_ratio`` ``log10(lam / lam*)``, ``schedule`` (``lam`` against cycles, downsampled),
      ``wall_s``, ``resumed_from_step``.
    """
    x_train, y_train, x_val, y_val = (jnp.asarray(a, jnp.float32) for a in problem)
    d = x_train.shape[1]
    run_config = config.to_dict() if run_config is None else run_config
    key = jax.random.key(config.seed)
    k_warm, k_run = jax.random.split(key)
    desc = desc or f"ridge/{config.method}"
    wall_warmup = 0.0

    if config.method == "unrolled":
        p64 = [np.asarray(a, np.float64) for a in problem]
        gram_max = float(np.linalg.eigvalsh(p64[0].T @ p64[0] / p64[0].shape[0])[-1])
        ts = make_unrolled_step(gram_max, config)
        state = ts.init(jnp.zeros((d,), jnp.float32), math.log(config.init_weight_decay))
        data = ((x_train, y_train), (x_val, y_val))
        run = run_chunked(ts, state, None, key=k_run, num_steps=config.cycles, batch_fn=lambda k, t: data,
                          out_dir=out_dir, config=run_config, chunk_size=chunk_size, desc=desc, progress=progress)
        w = run.state.inner.params
        val_model = float(jnp.mean(jnp.square(x_val @ w - y_val)))
        lam = float(jnp.exp(run.state.outer.params["log_weight_decay"]))
    else:
        stn = make_ridge_stn(config)
        state = stn.init(init_ridge_params(d))
        if config.warmup:
            # Deterministic given the seed, so a resumed run recomputes the same warm-up.
            warm = run_chunked(stn.weight_step, state, None, key=k_warm, num_steps=config.warmup,
                               batch_fn=lambda k, t: (x_train, y_train), out_dir=None, config=run_config,
                               chunk_size=config.warmup, desc=f"{desc} warm-up", progress=progress)
            state, wall_warmup = warm.state, warm.wall_s
        cycle_data = ((jnp.broadcast_to(x_train, (config.t_train, *x_train.shape)),
                       jnp.broadcast_to(y_train, (config.t_train, *y_train.shape))),
                      (jnp.broadcast_to(x_val, (config.t_val, *x_val.shape)),
                       jnp.broadcast_to(y_val, (config.t_val, *y_val.shape))))
        run = run_chunked(stn.cycle_step, state, None, key=k_run, num_steps=config.cycles,
                          batch_fn=lambda k, t: cycle_data, out_dir=out_dir, config=run_config,
                          chunk_size=chunk_size, desc=desc, progress=progress)
        val_model = float(jnp.mean(jnp.square(stn.predict_at(run.state, x_val) - y_val)))
        lam = float(stn.space.values(run.state.hyper.params["u"])["weight_decay"])

    p64 = RidgeProblem(*(np.asarray(a, np.float64) for a in problem))
    lam_star, val_star = ridge_optimal_lambda(p64)
    val = ridge_validation_loss(p64, lam)
    regret = (val - val_star) / val_star if val_star > 0 else float("nan")
    return {
        "weight_decay": lam,
        "val_loss": val,
        "val_loss_model": val_model,
        "weight_decay_closed_form": lam_star,
        "val_loss_closed_form": val_star,
        "regret": regret,
        "log10_ratio": math.log10(lam / lam_star),
        "schedule": _schedule(run.history["hp/weight_decay"]),
        "wall_s": run.wall_s + wall_warmup,
        "resumed_from_step": run.resumed_from,
    }
