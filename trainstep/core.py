"""The training-step abstraction shared by every package of the library.

A *training step* is a pure function ``step(state, batch, hparams, key) -> (state, metrics)``
bundled with its ``init``, in the spirit of optax's ``GradientTransformation``. Hyperparameters
are array leaves passed as arguments (never Python floats baked into a closure), so
``jax.grad`` through :func:`unroll` gives hypergradients and changing them does not recompile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

PyTree = Any
Metrics = dict
StepFn = Callable[[PyTree, PyTree, PyTree, jax.Array], tuple[PyTree, Metrics]]
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array], tuple[jax.Array, Any]]
BatchFn = Callable[[jax.Array, jax.Array], PyTree]


class TrainStep(NamedTuple):
    """A pair of pure functions describing one step of training.

    Attributes:
      init: builds the initial state (for :func:`gradient_step`, ``init(params, hparams)``).
      step: ``step(state, batch, hparams, key) -> (state, metrics)`` where ``metrics`` is a
        dict of scalars (or small arrays) that :func:`unroll` stacks over steps.
    """

    init: Callable[..., PyTree]
    step: StepFn


class TrainState(NamedTuple):
    """State of an ordinary gradient step: step counter, parameters, optimiser state."""

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState


OptimizerLike = Union[optax.GradientTransformation, Callable[[PyTree], optax.GradientTransformation]]


def _resolve_optimizer(optimizer: OptimizerLike, hparams: PyTree) -> optax.GradientTransformation:
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    if callable(optimizer):
        if hparams is None:
            raise TypeError(
                "this step's optimizer is a function of the hyperparameters: call init(params, hparams) "
                "and pass hparams to the step"
            )
        tx = optimizer(hparams)
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                "optimizer factory must return an optax.GradientTransformation, got "
                f"{type(tx).__name__}"
            )
        return tx
    raise TypeError(
        "optimizer must be an optax.GradientTransformation or a function "
        f"hparams -> GradientTransformation, got {type(optimizer).__name__}"
    )


def gradient_step(loss_fn: LossFn, optimizer: OptimizerLike, *, has_aux: bool = True,
                  log_grad_norm: bool = False) -> TrainStep:
    """Builds the ordinary gradient step from a loss and an optax optimiser.

    Args:
      loss_fn: ``loss_fn(params, batch, hparams, key) -> (loss, aux)`` with ``aux`` a dict of
        metrics (or ``None``); with ``has_aux=False`` it returns the loss alone.
      optimizer: either a fixed ``optax.GradientTransformation``, or a function
        ``hparams -> GradientTransformation`` called inside the step with the *traced*
        hyperparameters, e.g. ``lambda h: optax.sgd(h["learning_rate"])``. The second form makes
        optimiser hyperparameters differentiable and changeable without recompiling. The
        optimiser state's structure must not depend on the hyperparameter values (true of
        every optax optimiser whose hyperparameters are numbers).
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      log_grad_norm: also record the global gradient norm as ``grad_norm`` (off by default: on
        small models its extra reductions cost several percent of a step).

    Returns:
      A :class:`TrainStep` whose ``init(params, hparams)`` returns a :class:`TrainState` and whose
      step's metrics hold ``loss``, the entries of ``aux`` and optionally ``grad_norm``.

    Example:
      >>> def loss_fn(w, batch, hparams, key):
      ...     x, y = batch
      ...     return jnp.mean((x @ w - y) ** 2) + hparams["l2"] * w @ w, {}
      >>> ts = gradient_step(loss_fn, lambda h: optax.sgd(h["learning_rate"]))
      >>> hp = {"learning_rate": 0.1, "l2": 1e-3}
      >>> state = ts.init(jnp.zeros(3), hp)
    """

    def init(params: PyTree, hparams: PyTree = None) -> TrainState:
        tx = _resolve_optimizer(optimizer, hparams)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def step(state: TrainState, batch: PyTree, hparams: PyTree, key: jax.Array):
        def wrapped(params):
            out = loss_fn(params, batch, hparams, key)
            return out if has_aux else (out, None)

        (loss, aux), grads = jax.value_and_grad(wrapped, has_aux=True)(state.params)
        tx = _resolve_optimizer(optimizer, hparams)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss}
        if log_grad_norm:
            metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(jnp.abs(g) ** 2) for g in jax.tree.leaves(grads)))
        if aux:
            if not isinstance(aux, dict):
                raise TypeError(f"loss_fn's aux must be a dict of metrics or None, got {type(aux).__name__}")
            metrics.update(aux)
        return TrainState(state.step + 1, params, opt_state), metrics

    return TrainStep(init=init, step=step)


def _as_step_fn(step: Union[TrainStep, StepFn]) -> StepFn:
    if isinstance(step, TrainStep):
        return step.step
    if callable(step):
        return step
    raise TypeError(f"step must be a TrainStep or a step function, got {type(step).__name__}")


def _leading_dim(tree: PyTree) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("batches is an empty pytree")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        raise ValueError(f"every leaf of batches needs the same leading (step) axis, got sizes {sizes}")
    return sizes.pop()


def auto_checkpoint_levels(num_steps: int) -> int:
    """Levels of nested checkpointing used by ``checkpoint=True`` (about 6 steps a block)."""
    return max(1, math.ceil(math.log(max(num_steps, 2)) / math.log(6.0)))


def _nested_scan(body, carry, ts, levels: int):
    """``lax.scan(body, carry, ts)`` with recursive rematerialisation.

    With ``levels = 1`` each step is wrapped in ``jax.checkpoint``, so the backward pass stores
    only the carry of every step. With more levels the steps are grouped into about
    ``n = T**(1/levels)`` blocks, each block itself a checkpointed nested scan: the backward pass
    stores about ``levels * n`` carries instead of ``T`` (memory O(levels * T**(1/levels))) at
    the price of ``levels`` extra forward passes.
    """
    length = ts.shape[0]
    if levels <= 1 or length <= 2:
        return lax.scan(jax.checkpoint(body), carry, ts)
    n_blocks = max(2, math.ceil(length ** (1.0 / levels)))
    block = length // n_blocks
    main = block * n_blocks

    def block_body(c, ts_block):
        return _nested_scan(body, c, ts_block, levels - 1)

    carry, ys = lax.scan(jax.checkpoint(block_body), carry, ts[:main].reshape(n_blocks, block))
    ys = jax.tree.map(lambda y: y.reshape((main,) + y.shape[2:]), ys)
    if main < length:
        carry, ys_rest = _nested_scan(body, carry, ts[main:], levels - 1)
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, ys_rest)
    return carry, ys


def unroll(
    step: Union[TrainStep, StepFn],
    state: PyTree,
    hparams: PyTree,
    *,
    key: jax.Array,
    num_steps: Optional[int] = None,
    batches: Optional[PyTree] = None,
    batch_fn: Optional[BatchFn] = None,
    checkpoint: Union[bool, int] = False,
    step_offset: Union[int, jax.Array] = 0,
) -> tuple[PyTree, Metrics]:
    """Runs ``num_steps`` training steps in one ``lax.scan``.

    Differentiable with respect to ``hparams`` and the initial ``state``.

    Step ``t`` (counting from ``step_offset``) uses ``key_t = fold_in(key, t)``: its minibatch
    is ``batch_fn(fold_in(key_t, 0), t)`` and the step receives ``fold_in(key_t, 1)``. Because
    keys depend on the global step index, running ``[0, n)`` then ``[n, T)`` with
    ``step_offset=n`` gives exactly the run ``[0, T)`` (this is how the runner resumes).

    Args:
      step: a :class:`TrainStep` or a bare step function.
      state: initial training state.
      hparams: pytree of hyperparameters (array leaves), the same at every step.
      key: PRNG key (``jax.random.key`` or legacy ``PRNGKey``).
      num_steps: number of steps; required with ``batch_fn``, inferred from ``batches``.
      batches: stacked minibatches, each leaf with leading axis ``num_steps``.
      batch_fn: ``batch_fn(key, t) -> batch`` sampling a minibatch inside jit, typically by
        indexing device-resident arrays (see :func:`trainstep.data.minibatch_fn`).
      checkpoint: ``False`` stores every step's residuals for the backward pass. ``True`` bounds
        memory with nested ``jax.checkpoint`` (memory grows like ``T**(1/L)``, ``L`` levels
        chosen automatically); an ``int`` sets ``L`` itself (``1``: checkpoint each step).
      step_offset: global index of the first step (int or traced int).

    Returns:
      ``(final_state, metrics)`` with every metric stacked along a leading axis of size
      ``num_steps``.

    Example:
      >>> state, metrics = unroll(ts, state, hp, key=jax.random.key(0), batches=stacked)
      >>> metrics["loss"].shape  # (num_steps,)
    """
    step_fn = _as_step_fn(step)
    if (batches is None) == (batch_fn is None):
        raise ValueError("unroll needs exactly one of batches= (stacked) or batch_fn= (sampled in jit)")
    if batches is not None:
        n = _leading_dim(batches)
        if num_steps is not None and num_steps != n:
            raise ValueError(f"num_steps={num_steps} but batches has {n} steps on its leading axis")
        num_steps = n
    if num_steps is None:
        raise ValueError("unroll with batch_fn= needs num_steps=")
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}")

    offset = jnp.asarray(step_offset, jnp.int32)

    def body(carry, i):
        t = offset + i
        key_t = jax.random.fold_in(key, t)
        if batches is not None:
            batch = jax.tree.map(lambda b: b[i], batches)
        else:
            batch = batch_fn(jax.random.fold_in(key_t, 0), t)
        return step_fn(carry, batch, hparams, jax.random.fold_in(key_t, 1))

    ts = jnp.arange(num_steps, dtype=jnp.int32)
    if checkpoint is False or checkpoint is None:
        return lax.scan(body, state, ts)
    levels = auto_checkpoint_levels(num_steps) if checkpoint is True else int(checkpoint)
    if levels < 1:
        raise ValueError(f"checkpoint levels must be >= 1, got {checkpoint!r}")
    return _nested_scan(body, state, ts, levels)
