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

Besides an array, ``h`` may be ``None`` (the response is off: the plain layer, Delta-STN's centre)
or :class:`Centred` (Delta-STN's linearisation: the value of the plain layer, the derivative in the
offset of the best-response layer), so that Delta-STN does not compute a response whose value is
zero (see ``make_stn(..., passes_h_to_layers=True)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any
RESPONSE = "response"
GENERAL = "general"


class Centred(NamedTuple):
    """The hypernetwork input at Delta-STN's centre, carrying the direction of a linearisation.

    ``offset`` ``(B, n_h)`` stands for an offset from the centre whose *value is zero*: a layer given
    ``Centred(d)`` returns the plain layer's output, and its forward-mode derivative in ``d`` is the
    response's ``(d' V_w) * (x W_r) + (d' V_b) * b_r``, the derivative of the best-response layer at
    ``h = 0``. So ``jax.jvp(lambda d: net(x, Centred(d)), (zeros,), (h,))`` gives the network
    linearised in its response (Delta-STN) without the zero-valued response, its zero-valued
    derivatives (``(0 V) * (x' W_r)``), or reverse-mode work through them: with ``h = zeros`` the
    same ``jax.jvp`` costs about twice as much on an MLP (the gradients are the same).
    """

    offset: jax.Array


HInput = Union[jax.Array, Centred, None]


def _add_response(y: jax.Array, r: dict, x: jax.Array, h: HInput, apply_kernel: Callable) -> jax.Array:
    """``y + (h V_w) * apply_kernel(x, W_r) + (h V_b) * b_r`` with the scales broadcast over ``y``'s
    middle axes; ``h=None``: ``y``; ``h=Centred(d)``: see :class:`Centred`."""
    if h is None:
        return y
    if isinstance(h, Centred):
        return y + _centred_response(apply_kernel, r, x, h.offset)
    s_w, s_b, bias = _scales(h, r, y.ndim)
    return y + s_w * apply_kernel(x, r["kernel"]) + s_b * bias


def _scales(h, r, ndim):
    mid = (slice(None),) + (None,) * (ndim - 2) + (slice(None),)
    bias = r["bias"][(None,) * (ndim - 1) + (slice(None),)]
    return (h @ r["scale_kernel"])[mid], (h @ r["scale_bias"])[mid], bias


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _centred_response(apply_kernel, r, x, d):
    # The response at an offset d whose value is 0 (Centred): zero, computed without the matmul.
    out = jax.eval_shape(apply_kernel, x, r["kernel"])
    return jnp.zeros(out.shape, out.dtype)


@_centred_response.defjvp
def _centred_response_jvp(apply_kernel, primals, tangents):
    # At d = 0 every term of the product rule but d's vanishes: (d' V) * (x W_r) + (d' V_b) * b_r.
    r, x, d = primals
    d_dot = tangents[2]
    xw = apply_kernel(x, r["kernel"])
    s_w, s_b, bias = _scales(d_dot, r, xw.ndim)
    return jnp.zeros_like(xw), s_w * xw + s_b * bias


def _matmul(x, kernel):
    return x @ kernel


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


def best_response_dense(params: dict, x: jax.Array, h: HInput) -> jax.Array:
    """``x W + b + (h V_w) * (x W_r) + (h V_b) * b_r`` for ``x (B, d_in)``, ``h (B, n_h)``.

    ``h=None`` gives the plain layer ``x W + b`` (the response off); ``h=Centred(d)``: see
    :class:`Centred`."""
    g = params[GENERAL]
    y = x @ g["kernel"] + g["bias"][None, :]
    return _add_response(y, params[RESPONSE], x, h, _matmul)


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


def best_response_conv(params: dict, x: jax.Array, h: HInput, padding: str = "SAME") -> jax.Array:
    """2-D convolution (``x`` NHWC) with per-output-channel response scales from ``h (B, n_h)``
    (``None`` or :class:`Centred` as in :func:`best_response_dense`)."""
    g = params[GENERAL]
    y = _conv(x, g["kernel"], padding) + g["bias"][None, None, None, :]
    return _add_response(y, params[RESPONSE], x, h, functools.partial(_conv, padding=padding))


class BestResponseDense(nn.Module):
    """Flax module of :func:`best_response_dense`: ``BestResponseDense(features)(x, h)``."""

    features: int
    response_scale: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, h: HInput) -> jax.Array:
        d_in, n_h = x.shape[-1], _n_h(self, h)
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
    def __call__(self, x: jax.Array, h: HInput) -> jax.Array:
        c_in, n_h = x.shape[-1], _n_h(self, h)
        kh, kw = self.kernel_size
        shapes = _shapes((kh, kw, c_in, self.features), self.features, n_h)
        params = {group: {name: self.param(f"{group}_{name}", _init_like(group, name, self.response_scale,
                                                                          fan_in=kh * kw * c_in, n_h=n_h), shape)
                          for name, shape in names.items()}
                  for group, names in shapes.items()}
        return best_response_conv(params, x, h, self.padding)


def _n_h(module: nn.Module, h: HInput) -> int:
    if h is not None:
        return (h.offset if isinstance(h, Centred) else h).shape[-1]
    name = f"{RESPONSE}_scale_kernel"
    if not module.has_variable("params", name):
        raise ValueError(f"{type(module).__name__}: initialise with an h array (B, n_h), not None")
    return module.get_variable("params", name).shape[0]


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
