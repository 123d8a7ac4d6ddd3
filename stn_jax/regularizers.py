"""Regularisers whose strength is a (per-example) hyperparameter.

All take the hyperparameter as an array broadcastable against the batch (``(B,)`` per example or a
scalar per batch). The random masks and noise carry no gradient to the hyperparameter (as in the
official STN code: the hyper step differentiates the validation loss, where these are off, through
the best-response weights only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_DROPOUT = 0.9  # dropout rates are capped for stability (MacKay et al.)


def dropout(key: jax.Array, x: jax.Array, rate: jax.Array, *, cap: float = MAX_DROPOUT) -> jax.Array:
    """Inverted dropout with a per-example ``rate`` of shape ``(B,)`` (or scalar), capped at ``cap``.

    ``x`` has a leading batch axis; each example keeps units with probability ``1 - rate``."""
    rate = jnp.clip(jax.lax.stop_gradient(jnp.asarray(rate, x.dtype)), 0.0, cap)
    keep = 1.0 - rate
    keep = jnp.reshape(keep, keep.shape + (1,) * (x.ndim - keep.ndim))
    mask = jax.random.uniform(key, x.shape, x.dtype) < keep
    return jnp.where(mask, x / keep, 0.0)


def gaussian_noise(key: jax.Array, x: jax.Array, std: jax.Array) -> jax.Array:
    """``x + std * N(0, 1)`` with a per-example ``std`` of shape ``(B,)`` (or scalar)."""
    std = jax.lax.stop_gradient(jnp.asarray(std, x.dtype))
    std = jnp.reshape(std, std.shape + (1,) * (x.ndim - std.ndim))
    return x + std * jax.random.normal(key, x.shape, x.dtype)


def l2_penalty(params, weight: jax.Array) -> jax.Array:
    """``weight / 2 * |params|^2`` (training loss only; ``weight`` a scalar)."""
    sq = sum(jnp.sum(jnp.square(p)) for p in jax.tree.leaves(params))
    return 0.5 * weight * sq


def random_shift(key: jax.Array, x: jax.Array, magnitude: jax.Array) -> jax.Array:
    """MNIST-1D augmentation: shift each signal ``(B, L)`` circularly by a random fraction of its
    length, uniform in ``[-magnitude, magnitude]`` (``magnitude`` per example, in [0, 1]), with
    linear interpolation so the shift is continuous in the magnitude."""
    b, length = x.shape
    mag = jax.lax.stop_gradient(jnp.broadcast_to(jnp.asarray(magnitude, x.dtype), (b,)))
    shift = jax.random.uniform(key, (b,), x.dtype, -1.0, 1.0) * mag * length
    pos = (jnp.arange(length, dtype=x.dtype)[None, :] - shift[:, None]) % length
    lo = jnp.floor(pos).astype(jnp.int32)
    frac = pos - lo
    hi = (lo + 1) % length
    take = jax.vmap(lambda row, i: row[i])
    return (1.0 - frac) * take(x, lo) + frac * take(x, hi)
