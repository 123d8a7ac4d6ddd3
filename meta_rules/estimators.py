"""How the meta-gradient is estimated: truncated backprop, antithetic ES, PES, each vmapped over tasks.

Each estimator is a pure function ``(unroller, theta, states, key, ...) -> EstimatorOutput`` over a batch of
episode states (leading axis: tasks), returning the mean truncation loss, the mean gradient estimate with
respect to θ, and the states to continue from. :class:`GradientEstimator` bundles one with its ``init`` so
that :mod:`meta_rules.meta_train` can take any of them.

* **Truncated backprop**: ``jax.grad`` through one truncation (with ``UnrollConfig.checkpoint`` for
  ``jax.checkpoint``), the state it starts from held constant. Biased towards short horizons, cheap.
* **Antithetic ES**: ``(L(θ + ε) - L(θ - ε)) / (2σ²) · ε`` with ``ε ~ N(0, σ² I)``, both particles on the same
  minibatches; needs no derivative of the inner loop (step activations). The episode continues from the
  positive particle. Like truncated backprop it ignores how θ shaped the state it starts from.
* **PES** (Vicol et al. 2021): the positive and negative particles persist across truncations, each
  perturbed by a fresh ``±ε_τ`` every truncation, and the estimate uses the accumulated ``Σ ε``: unbiased for
  the Gaussian-smoothed sum of truncation losses over the episode, without differentiating the inner loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from meta_rules.objective import TruncatedUnroll
from trainstep.runner import ConfigError

PyTree = Any


class EstimatorOutput(NamedTuple):
    """``loss``: mean over tasks of the truncation loss (for ES/PES, of the two particles); ``grad``: the mean
    gradient estimate (θ's structure); ``states``: the batch of states to continue from; ``done``: the
    fraction of episodes that ended in this truncation."""

    loss: jax.Array
    grad: PyTree
    states: PyTree
    done: jax.Array


class GradientEstimator(NamedTuple):
    """``init(key, num_tasks, theta) -> states`` and ``estimate(theta, states, key) -> EstimatorOutput``."""

    init: Callable[[jax.Array, int, PyTree], PyTree]
    estimate: Callable[[PyTree, PyTree, jax.Array], EstimatorOutput]


class PESState(NamedTuple):
    """One PES episode: its two particles and the perturbations accumulated since it started."""

    pos: PyTree
    neg: PyTree
    accumulated: PyTree


def _num_tasks(states: PyTree) -> int:
    leaves = jax.tree.leaves(states)
    if not leaves or jnp.ndim(leaves[0]) == 0:
        raise ConfigError("states must be a batch of episode states with a leading task axis (see init_states)")
    return leaves[0].shape[0]


def _mean(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def _check_sigma(sigma) -> None:
    if isinstance(sigma, (int, float)) and not sigma > 0:
        raise ConfigError(f"sigma must be > 0, got {sigma}")


def perturbation(key: jax.Array, theta: PyTree, sigma) -> PyTree:
    """``ε ~ N(0, σ² I)`` with θ's structure (one key per leaf)."""
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [sigma * jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
                                        for k, x in zip(keys, leaves, strict=True)])


def _add(a: PyTree, b: PyTree, scale=1.0) -> PyTree:
    return jax.tree.map(lambda x, y: x + scale * y, a, b)


def init_states(unroller: TruncatedUnroll, key: jax.Array, num_tasks: int) -> PyTree:
    """A batch of ``num_tasks`` fresh episodes (leading axis: tasks)."""
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ConfigError(f"num_tasks must be a positive integer, got {num_tasks!r}")
    return jax.vmap(unroller.init)(jax.random.split(key, num_tasks))


def init_pes_states(unroller: TruncatedUnroll, theta: PyTree, key: jax.Array, num_tasks: int) -> PESState:
    """A batch of fresh PES episodes: both particles equal, nothing accumulated."""
    states = init_states(unroller, key, num_tasks)
    zeros = jax.tree.map(lambda x: jnp.zeros((num_tasks,) + jnp.shape(x), jnp.result_type(x)), theta)
    return PESState(pos=states, neg=states, accumulated=zeros)


def truncated_backprop(unroller: TruncatedUnroll, theta: PyTree, states: PyTree, key: jax.Array) -> EstimatorOutput:
    """Gradient of each task's truncation loss by back-propagation through the truncation, averaged.

    Example:
      >>> states = init_states(mu, jax.random.key(0), 8)
      >>> out = jax.jit(lambda th, s, k: truncated_backprop(mu, th, s, k))(theta, states, key)
    """
    keys = jax.random.split(key, _num_tasks(states))

    def one(state, k):
        def objective(th):
            new_state, loss, done = unroller.unroll(th, jax.lax.stop_gradient(state), k)
            return loss, (new_state, done)

        (loss, (new_state, done)), grad = jax.value_and_grad(objective, has_aux=True)(theta)
        return loss, grad, new_state, done

    losses, grads, new_states, done = jax.vmap(one)(states, keys)
    return EstimatorOutput(jnp.mean(losses), _mean(grads), new_states, jnp.mean(done.astype(jnp.float32)))


def antithetic_es(unroller: TruncatedUnroll, theta: PyTree, states: PyTree, key: jax.Array, *,
                  sigma) -> EstimatorOutput:
    """Antithetic evolution-strategies estimate of the truncation-loss gradient, one pair per task.

    Args:
      unroller: the inner problem.
      theta: meta-parameters.
      states: batch of episode states.
      key: PRNG key (perturbations; both particles share the truncation key, hence its minibatches).
      sigma: perturbation scale (float or array).

    Returns:
      :class:`EstimatorOutput`; the states continue from the positive particles.
    """
    _check_sigma(sigma)
    keys = jax.random.split(key, _num_tasks(states))

    def one(state, k):
        k_eps, k_unroll = jax.random.split(k)
        eps = perturbation(k_eps, theta, sigma)
        s_pos, l_pos, done = unroller.unroll(_add(theta, eps), state, k_unroll)
        _, l_neg, _ = unroller.unroll(_add(theta, eps, -1.0), state, k_unroll)
        scale = (l_pos - l_neg) / (2.0 * sigma ** 2)
        return 0.5 * (l_pos + l_neg), jax.tree.map(lambda e: scale * e, eps), s_pos, done

    losses, grads, new_states, done = jax.vmap(one)(states, keys)
    return EstimatorOutput(jnp.mean(losses), _mean(grads), new_states, jnp.mean(done.astype(jnp.float32)))


def pes(unroller: TruncatedUnroll, theta: PyTree, states: PESState, key: jax.Array, *, sigma) -> EstimatorOutput:
    """Persistent evolution strategies: an unbiased estimate over whole episodes, one truncation at a time.

    Each truncation ``τ`` perturbs the positive particle by ``+ε_τ`` and the negative by ``-ε_τ`` and
    returns ``(L⁺_τ - L⁻_τ) / (2σ²) · Σ_{s≤τ} ε_s``; summed over an episode's truncations its expectation
    is the gradient of the expected sum of truncation losses under the perturbations (the smoothed
    objective; for a loss quadratic in θ, exactly the true gradient). When an episode ends both particles
    restart from the same fresh state and the sum is reset.

    Args:
      unroller, theta, key, sigma: as in :func:`antithetic_es`.
      states: a :class:`PESState` batch (see :func:`init_pes_states`).

    Returns:
      :class:`EstimatorOutput` whose ``states`` is the next :class:`PESState`.
    """
    _check_sigma(sigma)
    if not isinstance(states, PESState):
        raise ConfigError(f"pes needs PESState states (see init_pes_states), got {type(states).__name__}")
    keys = jax.random.split(key, _num_tasks(states.pos))

    def one(st, k):
        k_eps, k_unroll = jax.random.split(k)
        eps = perturbation(k_eps, theta, sigma)
        s_pos, l_pos, done = unroller.unroll(_add(theta, eps), st.pos, k_unroll)
        s_neg, l_neg, _ = unroller.unroll(_add(theta, eps, -1.0), st.neg, k_unroll)
        accumulated = _add(st.accumulated, eps)
        scale = (l_pos - l_neg) / (2.0 * sigma ** 2)
        grad = jax.tree.map(lambda a: scale * a, accumulated)
        accumulated = jax.tree.map(lambda a: jnp.where(done, jnp.zeros_like(a), a), accumulated)
        return 0.5 * (l_pos + l_neg), grad, PESState(s_pos, s_neg, accumulated), done

    losses, grads, new_states, done = jax.vmap(one)(states, keys)
    return EstimatorOutput(jnp.mean(losses), _mean(grads), new_states, jnp.mean(done.astype(jnp.float32)))


ESTIMATORS = ("tbptt", "es", "pes")


def make_estimator(unroller: TruncatedUnroll, name: str = "tbptt", *, sigma: float = 0.01) -> GradientEstimator:
    """One of :data:`ESTIMATORS` (``"tbptt"``, ``"es"``, ``"pes"``) bundled with its ``init``.

    ``init(key, num_tasks, theta)`` takes θ because PES accumulates perturbations of θ's structure.

    Example:
      >>> est = make_estimator(mu, "pes", sigma=0.01)
      >>> states = est.init(jax.random.key(0), 8, theta)
      >>> out = jax.jit(est.estimate)(theta, states, key)
    """
    if not isinstance(unroller, TruncatedUnroll):
        raise ConfigError(f"unroller must be a TruncatedUnroll, got {type(unroller).__name__}")
    if name == "tbptt":
        return GradientEstimator(lambda key, n, theta: init_states(unroller, key, n),
                                 lambda th, s, k: truncated_backprop(unroller, th, s, k))
    _check_sigma(sigma)
    if name == "es":
        return GradientEstimator(lambda key, n, theta: init_states(unroller, key, n),
                                 lambda th, s, k: antithetic_es(unroller, th, s, k, sigma=sigma))
    if name == "pes":
        return GradientEstimator(lambda key, n, theta: init_pes_states(unroller, theta, key, n),
                                 lambda th, s, k: pes(unroller, th, s, k, sigma=sigma))
    raise ConfigError(f"unknown estimator {name!r}: expected one of {list(ESTIMATORS)}")
