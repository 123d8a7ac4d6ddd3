"""Best-response layers (MacKay et al. 2019): general weights plus hyperparameter-gated response
weights.

A best-response dense layer computes, for inputs ``x`` of shape ``(B, d_in)`` and per-example
hyperparameter vectors ``h`` of shape ``(B, n_h)``::

    y = x W + b + (h V_w) * (x W_r) + (h V_b) * b_r

``V_w`` and ``V_b`` (``(n_h, d_out)``, no bias) map the hyperparameters to per-unit scales, so the
weights are an affine ("linear best response") function of ``h``. The convolution is the same per
output channel. With the response part at zero (``W_r = b_r = 0`` or ``V = 0``) a layer is its
plain counterpart.

Both come as pure functions over a params dict (``init_best_response_dense``,
``best_response_dense``, ...) and as flax modules (:class:`BestResponseDense`,
:class:`BestResponseConv`), whose parameters are named ``general`` (``kernel``, ``bias``) and
``response`` (``kernel``, ``bias``, ``scale_kernel``, ``scale_bias``) so that optimisers and
Delta-STN can address the two groups (see :func:`split_response`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any
RESPONSE = "response"
GENERAL = "general"


def _lecun(key, shape, fan_in):
    return jax.random.normal(key, shape, jnp.float32) / jnp.sqrt(jnp.float32(fan_in))


def init_best_response_dense(key: jax.Array, d_in: int, d_out: int, n_hparams: int, *,
                             response_scale: float = 0.1) -> dict:
    """Parameters of :func:`best_response_dense`; the response weights start small."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        GENERAL: {"kernel": _lecun(k1, (d_in, d_out), d_in), "bias": jnp.zeros((d_out,), jnp.float32)},
        RESPONSE: {
            "kernel": response_scale * _lecun(k2, (d_in, d_out), d_in),
            "bias": jnp.zeros((d_out,), jnp.float32),
            "scale_kernel": _lecun(k3, (n_hparams, d_out), n_hparams),
            "scale_bias": _lecun(k4, (n_hparams, d_out), n_hparams),
        },
    }


def best_response_dense(params: dict, x: jax.Array, h: jax.Array) -> jax.Array:
    """``x W + b + (h V_w) * (x W_r) + (h V_b) * b_r`` for ``x (B, d_in)``, ``h (B, n_h)``."""
    g, r = params[GENERAL], params[RESPONSE]
    y = x @ g["kernel"] + g["bias"][None, :]
    return y + (h @ r["scale_kernel"]) * (x @ r["kernel"]) + (h @ r["scale_bias"]) * r["bias"][None, :]


def _conv(x, kernel, padding):
    return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def init_best_response_conv(key: jax.Array, c_in: int, c_out: int, kernel_size: Sequence[int], n_hparams: int, *,
                            response_scale: float = 0.1) -> dict:
    """Parameters of :func:`best_response_conv` (kernels ``HWIO``)."""
    kh, kw = kernel_size
    fan_in = kh * kw * c_in
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        GENERAL: {"kernel": _lecun(k1, (kh, kw, c_in, c_out), fan_in), "bias": jnp.zeros((c_out,), jnp.float32)},
        RESPONSE: {
            "kernel": response_scale * _lecun(k2, (kh, kw, c_in, c_out), fan_in),
            "bias": jnp.zeros((c_out,), jnp.float32),
            "scale_kernel": _lecun(k3, (n_hparams, c_out), n_hparams),
            "scale_bias": _lecun(k4, (n_hparams, c_out), n_hparams),
        },
    }


def best_response_conv(params: dict, x: jax.Array, h: jax.Array, padding: str = "SAME") -> jax.Array:
    """2-D convolution (``x`` NHWC) with per-output-channel response scales from ``h (B, n_h)``."""
    g, r = params[GENERAL], params[RESPONSE]
    y = _conv(x, g["kernel"], padding) + g["bias"][None, None, None, :]
    s_w = (h @ r["scale_kernel"])[:, None, None, :]
    s_b = (h @ r["scale_bias"])[:, None, None, :]
    return y + s_w * _conv(x, r["kernel"], padding) + s_b * r["bias"][None, None, None, :]


class BestResponseDense(nn.Module):
    """Flax module of :func:`best_response_dense`: ``BestResponseDense(features)(x, h)``."""

    features: int
    response_scale: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, h: jax.Array) -> jax.Array:
        d_in, n_h = x.shape[-1], h.shape[-1]
        shapes = _shapes((d_in, self.features), self.features, n_h)
        params = {group: {name: self.param(f"{group}_{name}", _init_like(group, name, self.response_scale,
                                                                          fan_in=d_in, n_h=n_h), shape)
                          for name, shape in names.items()}
                  for group, names in shapes.items()}
        return best_response_dense(params, x, h)


class BestResponseConv(nn.Module):
    """Flax module of :func:`best_response_conv`: ``BestResponseConv(features, (3, 3))(x, h)``."""

    features: int
    kernel_size: Sequence[int] = (3, 3)
    padding: str = "SAME"
    response_scale: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, h: jax.Array) -> jax.Array:
        c_in, n_h = x.shape[-1], h.shape[-1]
        kh, kw = self.kernel_size
        shapes = _shapes((kh, kw, c_in, self.features), self.features, n_h)
        params = {group: {name: self.param(f"{group}_{name}", _init_like(group, name, self.response_scale,
                                                                          fan_in=kh * kw * c_in, n_h=n_h), shape)
                          for name, shape in names.items()}
                  for group, names in shapes.items()}
        return best_response_conv(params, x, h, self.padding)


def _shapes(kernel_shape, d_out: int, n_h: int) -> dict:
    return {GENERAL: {"kernel": kernel_shape, "bias": (d_out,)},
            RESPONSE: {"kernel": kernel_shape, "bias": (d_out,), "scale_kernel": (n_h, d_out),
                       "scale_bias": (n_h, d_out)}}


def _init_like(group: str, name: str, response_scale: float, *, fan_in: int, n_h: int):
    def init(key, shape, dtype=jnp.float32):
        if name == "bias":
            return jnp.zeros(shape, dtype)
        if name in ("scale_kernel", "scale_bias"):
            return _lecun(key, shape, n_h).astype(dtype)
        scale = response_scale if group == RESPONSE else 1.0
        return (scale * _lecun(key, shape, fan_in)).astype(dtype)
    return init


def is_response_path(path) -> bool:
    """Whether a parameter (by its ``jax.tree_util`` key path) belongs to a response part."""
    for k in path:
        name = str(getattr(k, "key", getattr(k, "name", k)))
        if name == RESPONSE or name.startswith(RESPONSE + "_"):
            return True
    return False


def response_mask(params: PyTree) -> PyTree:
    """A pytree of booleans, true on the response parameters (for ``optax.masked`` and Delta-STN)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_response_path(p), params)


def split_response(params: PyTree) -> tuple[PyTree, PyTree]:
    """``(general, response)``: two copies of ``params`` with the other group's leaves zeroed."""
    mask = response_mask(params)
    general = jax.tree.map(lambda m, x: jnp.where(m, 0.0, x), mask, params)
    response = jax.tree.map(lambda m, x: jnp.where(m, x, 0.0), mask, params)
    return general, response
