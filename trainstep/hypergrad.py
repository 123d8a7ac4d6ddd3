"""Hypergradients through training: the exact (and expensive) method that STN approximates.

The gradient of a validation loss evaluated after ``T`` training steps with respect to the
hyperparameters used during those steps, obtained by reverse-mode differentiation through
:func:`trainstep.unroll`. *Truncated* hypergradients differentiate only through the last ``K``
steps and treat the state reached before them as a constant (biased, but memory and compute
scale with ``K`` rather than ``T``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from trainstep.core import BatchFn, StepFn, TrainStep, _leading_dim, unroll

PyTree = Any


def _slice_batches(batches: Optional[PyTree], start: int, stop: int) -> Optional[PyTree]:
    if batches is None:
        return None
    return jax.tree.map(lambda b: b[start:stop], batches)


def unrolled_validation_loss(
    step: Union[TrainStep, StepFn],
    state: PyTree,
    hparams: PyTree,
    val_fn: Callable[[PyTree], jax.Array],
    *,
    key: jax.Array,
    num_steps: Optional[int] = None,
    batches: Optional[PyTree] = None,
    batch_fn: Optional[BatchFn] = None,
    truncation: Optional[int] = None,
    checkpoint: Union[bool, int] = False,
) -> tuple[jax.Array, PyTree]:
    """Validation loss after training: ``val_fn(unroll(step, state, hparams, ...)[0])``.

    With ``truncation=K`` the first ``T - K`` steps run under ``stop_gradient`` so that only the
    last ``K`` steps carry gradient to ``hparams`` (the forward value is unchanged).

    Returns:
      ``(val_loss, final_state)``.
    """
    if batches is not None:
        total = _leading_dim(batches)
        if num_steps is not None and num_steps != total:
            raise ValueError(f"num_steps={num_steps} but batches has {total} steps")
    elif num_steps is None:
        raise ValueError("unrolled_validation_loss with batch_fn= needs num_steps=")
    else:
        total = num_steps
    if truncation is None or truncation >= total:
        final, _ = unroll(step, state, hparams, key=key, num_steps=total, batches=batches, batch_fn=batch_fn,
                          checkpoint=checkpoint)
        return val_fn(final), final
    if truncation < 1:
        raise ValueError(f"truncation must be >= 1 (or None for the full hypergradient), got {truncation}")
    head = total - truncation
    mid, _ = unroll(step, state, jax.lax.stop_gradient(hparams), key=key, num_steps=head,
                    batches=_slice_batches(batches, 0, head), batch_fn=batch_fn)
    mid = jax.lax.stop_gradient(mid)
    final, _ = unroll(step, mid, hparams, key=key, num_steps=truncation,
                      batches=_slice_batches(batches, head, total), batch_fn=batch_fn,
                      checkpoint=checkpoint, step_offset=head)
    return val_fn(final), final


def hypergradient(
    step: Union[TrainStep, StepFn],
    state: PyTree,
    hparams: PyTree,
    val_fn: Callable[[PyTree], jax.Array],
    *,
    key: jax.Array,
    num_steps: Optional[int] = None,
    batches: Optional[PyTree] = None,
    batch_fn: Optional[BatchFn] = None,
    truncation: Optional[int] = None,
    checkpoint: Union[bool, int] = False,
) -> tuple[jax.Array, PyTree]:
    """Gradient of the post-training validation loss with respect to ``hparams``.

    Args:
      step, state, hparams, key, num_steps, batches, batch_fn, checkpoint: as in
        :func:`trainstep.unroll`.
      val_fn: ``val_fn(final_state) -> scalar`` validation loss (e.g. the plain loss on
        validation data, regularisers off).
      truncation: ``None`` for the full hypergradient, or ``K`` to differentiate through the
        last ``K`` steps only.

    Returns:
      ``(val_loss, d val_loss / d hparams)``, the gradient with the structure of ``hparams``.

    Example:
      >>> loss, g = jax.jit(lambda h: hypergradient(ts, s0, h, val_fn, key=k, batches=b))(hp)
    """

    def objective(h):
        loss, _ = unrolled_validation_loss(step, state, h, val_fn, key=key, num_steps=num_steps,
                                           batches=batches, batch_fn=batch_fn,
                                           truncation=truncation, checkpoint=checkpoint)
        return loss

    hparams = jax.tree.map(jnp.asarray, hparams)
    return jax.value_and_grad(objective)(hparams)
