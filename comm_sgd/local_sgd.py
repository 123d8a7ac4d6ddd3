"""Local SGD as a wrapper around any ``trainstep`` step.

:func:`local_sgd` turns a training step into a *per-worker* step: each worker runs the wrapped
step on its own minibatch and, when the schedule says so, the workers average their parameters
with ``lax.pmean`` over a named axis. The same per-worker function runs

* simulated, ``K`` workers on one device: ``jax.vmap(step, axis_name=...)``;
* for real, one (or several) workers per device: ``jax.shard_map`` over a mesh axis, also across
  hosts after ``jax.distributed.initialize()``.

:mod:`comm_sgd.parallel` builds both from the per-worker step. The averaging flag arrives with the
batch (:class:`SyncBatch`) so that it is the same on every worker: the average then sits inside a
real ``lax.cond`` and the workers only communicate on the steps of the schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

from comm_sgd.step_sizes import AVERAGES, IterateAverage, init_average, update_average
from trainstep.core import TrainStep
from trainstep.runner import ConfigError

PyTree = Any
AxisName = Union[str, Sequence[str]]


class SyncBatch(NamedTuple):
    """A worker's minibatch together with the schedule's flag for this step.

    ``sync`` must be the same on every worker (it comes from the schedule, not from the data)."""

    data: PyTree
    sync: jax.Array


class LocalSGDState(NamedTuple):
    """Per-worker state of local SGD.

    Attributes:
      inner: the wrapped step's state (a ``TrainState`` for ``trainstep.gradient_step``).
      t: local steps done by this worker.
      communications: averaging rounds so far.
      anchor: parameters after the last average (used by the outer optimiser; ``()`` without one).
      outer_state: the outer optimiser's state (``()`` without one).
      average: running weighted average of this worker's iterates (the output iterate).
    """

    inner: PyTree
    t: jax.Array
    communications: jax.Array
    anchor: PyTree
    outer_state: PyTree
    average: IterateAverage


def _varying_axes(x) -> frozenset:
    """Mesh axes along which ``x`` varies inside ``shard_map`` (empty elsewhere).

    Spelled ``aval.vma`` in recent jax and ``aval.manual_axis_type.varying`` in jax 0.10."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "manual_axis_type", None)
        vma = getattr(mat, "varying", ()) if mat is not None else ()
    return frozenset(vma)


def _match_varying(y, like):
    """Marks ``y`` as varying along the axes ``like`` varies on, so that both branches of a
    ``lax.cond`` (averaged and not) have the same type under ``shard_map``'s ``check_vma``."""
    missing = _varying_axes(like) - _varying_axes(y)
    return lax.pcast(y, tuple(sorted(missing)), to="varying") if missing else y


def _axes(axis_name: AxisName) -> tuple[str, ...]:
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def worker_mean(tree: PyTree, axis_name: AxisName) -> PyTree:
    """Mean of every floating leaf over the workers (``lax.pmean`` over one or several named axes,
    innermost first); integer leaves (step counters) are left as they are."""

    def leaf(x):
        if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
            return x
        y = x
        for ax in reversed(_axes(axis_name)):
            y = lax.pmean(y, ax)
        return _match_varying(y, x)

    return jax.tree.map(leaf, tree)


def tree_nbytes(tree: PyTree, *, floating_only: bool = True) -> int:
    """Bytes of a pytree's (floating) leaves: what one average of it all-reduces."""
    total = 0
    for x in jax.tree.leaves(tree):
        dtype = jnp.result_type(x)
        if floating_only and not jnp.issubdtype(dtype, jnp.inexact):
            continue
        total += int(jnp.size(x)) * jnp.dtype(dtype).itemsize
    return total


def _default_get_params(state):
    return state.params


def _default_set_params(state, params):
    return state._replace(params=params)


def _default_get_opt_state(state):
    return state.opt_state


def _default_set_opt_state(state, opt_state):
    return state._replace(opt_state=opt_state)


def local_sgd(
    step: TrainStep,
    *,
    axis_name: AxisName = "workers",
    opt_state: str = "average",
    outer_optimizer: Optional[optax.GradientTransformation] = None,
    average: str = "last",
    average_shift: float = 1.0,
    get_params: Callable = _default_get_params,
    set_params: Callable = _default_set_params,
    get_opt_state: Callable = _default_get_opt_state,
    set_opt_state: Callable = _default_set_opt_state,
) -> TrainStep:
    """Wraps a training step into the per-worker step of local SGD.

    Args:
      step: the wrapped step, e.g. ``trainstep.gradient_step(loss, optax.sgd(schedule))``. Its
        state must expose the parameters (default: a ``TrainState``'s ``.params``).
      axis_name: the named axis (or axes, outermost first) that the workers are mapped over.
      opt_state: on an averaging step, ``"average"`` also averages the floating leaves of the
        optimiser state (momentum, Adam moments: the workers stay interchangeable) and
        ``"local"`` keeps each worker's own (no extra communication). Counters stay local.
      outer_optimizer: optional server optimiser applied at each average to the pseudo-gradient
        ``anchor - mean(params)`` where ``anchor`` are the parameters after the previous average
        (DiLoCo uses Nesterov momentum, FedAvg a server SGD). ``optax.sgd(1.0)`` is plain
        averaging.
      average: the output iterate: ``"last"``, ``"uniform"`` (Polyak-Ruppert) or ``"stich"``
        (weights ``(average_shift + t)**2``). Each worker averages its own iterates; the mean of
        these over the workers is the average of the worker-averaged iterates, since averaging
        is linear.
      average_shift: the shift ``a`` of the Stich weights.
      get_params, set_params, get_opt_state, set_opt_state: accessors for a state that is not
        a ``TrainState``.

    Returns:
      A :class:`TrainStep`: ``init(inner_state)`` and
      ``step(state, SyncBatch(data, sync), hparams, key)``, to be run under ``vmap`` or
      ``shard_map`` with ``axis_name`` bound (see :mod:`comm_sgd.parallel`). Metrics: the wrapped
      step's plus ``synced`` (1 where the workers averaged).
    """
    if opt_state not in ("average", "local"):
        raise ConfigError(f"opt_state must be 'average' or 'local', got {opt_state!r}")
    if average not in AVERAGES:
        raise ConfigError(f"unknown output average {average!r}; valid: {', '.join(AVERAGES)}")
    if outer_optimizer is not None and not isinstance(outer_optimizer, optax.GradientTransformation):
        raise TypeError(f"outer_optimizer must be an optax.GradientTransformation, got {type(outer_optimizer)}")

    def init(inner_state: PyTree) -> LocalSGDState:
        params = get_params(inner_state)
        if outer_optimizer is None:
            anchor, outer_state = (), ()
        else:
            anchor, outer_state = params, outer_optimizer.init(params)
        return LocalSGDState(inner_state, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                             anchor, outer_state, init_average(params))

    def synchronise(state: LocalSGDState, inner: PyTree) -> tuple[PyTree, PyTree, PyTree]:
        params = get_params(inner)
        mean = worker_mean(params, axis_name)
        anchor, outer_state = state.anchor, state.outer_state
        if outer_optimizer is not None:
            pseudo_grad = jax.tree.map(lambda a, m: a - m, anchor, mean)
            updates, outer_state = outer_optimizer.update(pseudo_grad, outer_state, anchor)
            mean = optax.apply_updates(anchor, updates)
            anchor = mean
        inner = set_params(inner, mean)
        if opt_state == "average":
            inner = set_opt_state(inner, worker_mean(get_opt_state(inner), axis_name))
        return inner, anchor, outer_state

    def local_step(state: LocalSGDState, batch: SyncBatch, hparams: PyTree, key: jax.Array):
        if not isinstance(batch, SyncBatch):
            raise TypeError("a local SGD step takes SyncBatch(data, sync) as its batch")
        inner, metrics = step.step(state.inner, batch.data, hparams, key)
        inner, anchor, outer_state = lax.cond(
            batch.sync,
            lambda: synchronise(state, inner),
            lambda: (inner, state.anchor, state.outer_state),
        )
        sync = jnp.asarray(batch.sync, jnp.int32)
        avg = update_average(state.average, get_params(inner), average, state.t, average_shift)
        round_bytes = tree_nbytes(get_params(inner))
        if opt_state == "average":
            round_bytes += tree_nbytes(get_opt_state(inner))
        metrics = dict(metrics, synced=sync, bytes_all_reduced=sync.astype(jnp.float32) * float(round_bytes))
        new = LocalSGDState(inner, state.t + 1, state.communications + sync, anchor, outer_state, avg)
        return new, metrics

    return TrainStep(init=init, step=local_step)


def output_params(state: LocalSGDState, axis_name: AxisName) -> PyTree:
    """The output iterate, averaged over the workers (call under the same ``vmap``/``shard_map``)."""
    return worker_mean(state.average.params, axis_name)
