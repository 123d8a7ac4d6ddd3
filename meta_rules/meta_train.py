"""How θ is updated: one meta-training step (estimate, clip, Adam) as a ``trainstep`` step.

The outer loop is itself a :class:`trainstep.TrainStep` whose state holds θ, the optax state and the batch
of episodes in progress, so :func:`trainstep.unroll` runs many meta-steps in one ``lax.scan`` and the
experiment runner can checkpoint and resume it like any other training.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from meta_rules.estimators import GradientEstimator
from trainstep.core import TrainStep, unroll
from trainstep.runner import ConfigError

PyTree = Any


class MetaTrainState(NamedTuple):
    """Outer step counter, meta-parameters θ, the outer optimiser's state, the episodes in progress."""

    step: jax.Array
    theta: PyTree
    opt_state: optax.OptState
    episodes: PyTree


def meta_optimizer(learning_rate: float = 1e-3, clip_norm: float = 1.0) -> optax.GradientTransformation:
    """Adam on the global-norm-clipped meta-gradient (the paper's outer optimiser)."""
    if not learning_rate > 0 or not clip_norm > 0:
        raise ConfigError(f"need learning_rate > 0 and clip_norm > 0, got {learning_rate}, {clip_norm}")
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(learning_rate))


def make_meta_train_step(estimator: GradientEstimator,
                         optimizer: Optional[optax.GradientTransformation] = None) -> TrainStep:
    """The meta-training step: estimate the meta-gradient on a batch of tasks, update θ.

    Args:
      estimator: from :func:`meta_rules.estimators.make_estimator`.
      optimizer: the outer optax optimiser (default :func:`meta_optimizer`).

    Returns:
      A :class:`TrainStep`: ``init(theta, key, num_tasks) -> MetaTrainState``;
      ``step(state, batch, hparams, key)`` ignores ``batch`` and ``hparams`` (tasks come from the
      episodes) and records ``loss`` (mean truncation loss over tasks), ``grad_norm`` (before clipping)
      and ``done`` (fraction of episodes that ended).

    Example:
      >>> mts = make_meta_train_step(make_estimator(mu, "tbptt"), meta_optimizer(3e-3))
      >>> state = mts.init(theta, jax.random.key(0), 8)
      >>> state, m = jax.jit(lambda s: trainstep.unroll(mts, s, None, key=k, num_steps=100,
      ...                                               batch_fn=lambda k, t: None))(state)
    """
    if not isinstance(estimator, GradientEstimator):
        raise ConfigError(f"estimator must be a GradientEstimator, got {type(estimator).__name__}")
    tx = meta_optimizer() if optimizer is None else optimizer

    def init(theta: PyTree, key: jax.Array, num_tasks: int) -> MetaTrainState:
        theta = jax.tree.map(jnp.asarray, theta)
        return MetaTrainState(jnp.zeros((), jnp.int32), theta, tx.init(theta), estimator.init(key, num_tasks, theta))

    def step(state: MetaTrainState, batch: PyTree, hparams: PyTree, key: jax.Array):
        del batch, hparams
        out = estimator.estimate(state.theta, state.episodes, key)
        updates, opt_state = tx.update(out.grad, state.opt_state, state.theta)
        theta = optax.apply_updates(state.theta, updates)
        metrics = {"loss": out.loss, "grad_norm": optax.tree.norm(out.grad), "done": out.done}
        return MetaTrainState(state.step + 1, theta, opt_state, out.states), metrics

    return TrainStep(init=init, step=step)


def meta_train(meta_step: TrainStep, state: MetaTrainState, *, key: jax.Array, num_steps: int,
               chunk: Optional[int] = None, callback=None) -> tuple[MetaTrainState, dict]:
    """Runs ``num_steps`` meta-steps, jitted in chunks of ``chunk`` steps (one ``lax.scan`` each).

    Args:
      meta_step: from :func:`make_meta_train_step`.
      state: its initial state.
      key: PRNG key; step ``t`` uses ``fold_in(key, t)``, so chunking does not change the result.
      num_steps: meta-steps to run.
      chunk: steps per compiled chunk (default: all at once).
      callback: called as ``callback(steps_done, state, chunk_metrics)`` after each chunk (logging).

    Returns:
      ``(state, metrics)`` with every metric stacked over the ``num_steps`` steps (numpy arrays).

    Example:
      >>> state, m = meta_train(mts, mts.init(theta, k0, 8), key=k1, num_steps=50)
      >>> m["loss"][-10:].mean() < m["loss"][:10].mean()
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ConfigError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    chunk = num_steps if chunk is None else chunk
    if num_steps and (not isinstance(chunk, int) or chunk < 1):
        raise ConfigError(f"chunk must be a positive integer, got {chunk!r}")
    run = jax.jit(lambda s, offset, n: unroll(meta_step, s, None, key=key, num_steps=n,
                                              batch_fn=lambda k, t: None, step_offset=offset),
                  static_argnums=2)
    history: dict = {}
    done = 0
    while done < num_steps:
        n = min(chunk, num_steps - done)
        state, m = run(state, done, n)
        for name, value in m.items():
            history.setdefault(name, []).append(np.asarray(value))
        done += n
        if callback is not None:
            callback(done, state, m)
    return state, {name: np.concatenate(v) for name, v in history.items()}
