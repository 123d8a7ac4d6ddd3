"""The base model a learned rule trains: an MLP with forward weights ``W`` and separate backward weights ``V``.

Layer ``l`` (``1..L``) holds ``w`` ``(n_{l-1}, n_l)``, ``b`` ``(n_l,)`` and ``v`` ``(n_l, n_{l-1})``; the
forward pass uses ``w`` and ``b`` only, and ``v`` carries the rule's top-down signal from layer ``l`` down to
layer ``l - 1`` (Metz et al. 2019 keep it separate from ``w`` so no weight transport is needed). Parameters
are a tuple of per-layer dicts, so one rule applies to any width and depth.

Pre-activations are optionally batch-normalised (no learned scale; the bias is added after the
normalisation, so it acts as the usual shift): the paper's base models use batch norm, and it keeps the
forward pass independent of the scale the rule drives the weights to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trainstep.runner import ConfigError

BaseParams = tuple  # of dicts {"w": (n_in, n_out), "b": (n_out,), "v": (n_out, n_in)}

BN_EPS = 1e-5


def _step(z: jax.Array) -> jax.Array:
    # The comparison has zero derivative everywhere, so back-propagation sends no signal through it.
    return (z > 0).astype(z.dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "leaky_relu": lambda z: jax.nn.leaky_relu(z, 0.1),
    "tanh": jnp.tanh,
    "step": _step,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """The nonlinearity called ``name``: ``relu``, ``leaky_relu`` (slope 0.1), ``tanh`` or ``step``.

    Raises:
      ConfigError: an unknown name.
    """
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}: expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    """Validates layer sizes ``(input, hidden..., output)``: at least two positive integers."""
    sizes = tuple(sizes)
    if len(sizes) < 2:
        raise ConfigError(f"an MLP needs sizes (input, ..., output) with at least one layer, got {sizes}")
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
            raise ConfigError(f"layer sizes must be positive integers, got {sizes}")
    return tuple(int(s) for s in sizes)


def init_base_mlp(key: jax.Array, sizes: Sequence[int]) -> BaseParams:
    """Random forward and backward weights (``N(0, 1/fan_in)`` each way), zero biases.

    Args:
      key: PRNG key.
      sizes: ``(input, hidden_1, ..., hidden_L)``; the last layer is the representation.

    Returns:
      A tuple of ``L`` dicts ``{"w", "b", "v"}``.

    Example:
      >>> params = init_base_mlp(jax.random.key(0), (64, 32, 32))
      >>> params[0]["w"].shape, params[0]["v"].shape
      ((64, 32), (32, 64))
    """
    sizes = check_sizes(sizes)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        kw, kv = jax.random.split(jax.random.fold_in(key, i))
        layers.append({
            "w": jax.random.normal(kw, (n_in, n_out)) / jnp.sqrt(n_in),
            "b": jnp.zeros((n_out,)),
            "v": jax.random.normal(kv, (n_out, n_in)) / jnp.sqrt(n_out),
        })
    return tuple(layers)


def with_backward_weights(dense_layers: Sequence[tuple[jax.Array, jax.Array]], key: jax.Array) -> BaseParams:
    """Turns a user's plain MLP ``[(W, b), ...]`` into base-model parameters with fresh random ``V``.

    Raises:
      ConfigError: shapes that do not chain (``W_l`` ``(n_{l-1}, n_l)``, ``b_l`` ``(n_l,)``).
    """
    layers = []
    prev = None
    for i, layer in enumerate(dense_layers):
        if not isinstance(layer, (tuple, list)) or len(layer) != 2:
            raise ConfigError(f"layer {i}: expected a pair (W, b), got {type(layer).__name__}")
        w, b = jnp.asarray(layer[0]), jnp.asarray(layer[1])
        if w.ndim != 2 or b.shape != (w.shape[1],):
            raise ConfigError(f"layer {i}: expected W (n_in, n_out) and b (n_out,), got {w.shape} and {b.shape}")
        if prev is not None and w.shape[0] != prev:
            raise ConfigError(f"layer {i}: W has {w.shape[0]} inputs but the previous layer has {prev} outputs")
        prev = w.shape[1]
        v = jax.random.normal(jax.random.fold_in(key, i), (w.shape[1], w.shape[0])) / jnp.sqrt(w.shape[1])
        layers.append({"w": w, "b": b, "v": v})
    if not layers:
        raise ConfigError("dense_layers is empty")
    return tuple(layers)


def check_params(params: BaseParams) -> tuple[int, ...]:
    """Checks that ``params`` is a chain of ``{"w", "b", "v"}`` layers; returns the sizes."""
    if not isinstance(params, (tuple, list)) or not params:
        raise ConfigError(f"base parameters must be a non-empty tuple of layer dicts, got {type(params).__name__}")
    sizes = []
    for i, layer in enumerate(params):
        if not isinstance(layer, dict) or set(layer) != {"w", "b", "v"}:
            keys = sorted(layer) if isinstance(layer, dict) else type(layer).__name__
            raise ConfigError(f"layer {i}: expected a dict with keys ['b', 'v', 'w'], got {keys}")
        n_in, n_out = jnp.shape(layer["w"]) if jnp.ndim(layer["w"]) == 2 else (None, None)
        if n_in is None or jnp.shape(layer["b"]) != (n_out,) or jnp.shape(layer["v"]) != (n_out, n_in):
            raise ConfigError(f"layer {i}: expected w (n_in, n_out), b (n_out,), v (n_out, n_in), got "
                              f"{jnp.shape(layer['w'])}, {jnp.shape(layer['b'])}, {jnp.shape(layer['v'])}")
        if sizes and sizes[-1] != n_in:
            raise ConfigError(f"layer {i}: w has {n_in} inputs but the previous layer has {sizes[-1]} outputs")
        sizes = sizes or [n_in]
        sizes.append(n_out)
    return tuple(sizes)


def batch_norm(a_BN: jax.Array) -> jax.Array:
    """Standardises each unit over the batch (no learned scale or shift)."""
    mean = jnp.mean(a_BN, axis=0, keepdims=True)
    var = jnp.mean((a_BN - mean) ** 2, axis=0, keepdims=True)
    return (a_BN - mean) * jax.lax.rsqrt(var + BN_EPS)


def base_forward(params: BaseParams, x_BD: jax.Array, *, activation: str = "relu",
                 normalize: bool = True) -> tuple[list[jax.Array], list[jax.Array]]:
    """The forward pass, keeping every layer's pre- and post-activations.

    Args:
      params: base-model parameters.
      x_BD: a batch of inputs.
      activation: the nonlinearity's name (see :func:`activation_fn`).
      normalize: batch-normalise the pre-activations (statistics of this batch).

    Returns:
      ``(pre, post)``: lists of ``L + 1`` arrays ``(B, n_l)``; index 0 is the input itself in both.

    Example:
      >>> pre, post = base_forward(params, x, activation="step")
      >>> representation = post[-1]
    """
    act = activation_fn(activation)
    pre, post = [x_BD], [x_BD]
    h = x_BD
    for layer in params:
        a = h @ layer["w"]
        z = (batch_norm(a) if normalize else a) + layer["b"][None, :]
        h = act(z)
        pre.append(z)
        post.append(h)
    return pre, post


def representation(params: BaseParams, x_BD: jax.Array, *, activation: str = "relu",
                   normalize: bool = True) -> jax.Array:
    """The top layer's post-activations ``(B, n_L)``: what the few-shot readout sees."""
    return base_forward(params, x_BD, activation=activation, normalize=normalize)[1][-1]
