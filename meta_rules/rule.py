"""The learned unsupervised update rule (Metz et al. 2019) as a ``trainstep`` step whose ``hparams`` are θ.

One small network, shared by every neuron of every layer, runs per neuron and per example. It sees the
neuron's pre-activation ``z``, post-activation ``h``, the top-down signal ``δ`` it received, and
statistics of the three over the minibatch (mean, spread, and a learned pooling of its hidden layer over the
batch). It emits, per example:

* ``c_w, c_v`` (``channels`` each): the neuron's vectors as the *post*-synaptic end of ``W`` (``V``);
* ``d_w, d_v`` (``channels`` each): the neuron's vectors as the *pre*-synaptic end of ``W`` (``V``);
* ``e``: the value it sends down; the layer below receives ``δ_{l-1} = e_l V_l`` (through the backward
  weights ``V``, not ``Wᵀ``); at the top, ``δ_L`` is the standardised pre-activation itself;
* ``β``: its bias update.

Then ``ΔW_l = mean_b d_w^{l-1} ⊗ c_w^l`` (a sum over channels of outer products), likewise ``ΔV_l`` and
``Δb_l = mean_b β^l``. Each update is normalised per receptive field (a column of ``W``, of ``V``; the
layer's bias vector) to the scale of the initial weights and applied with a bounded step size
``max_step * sigmoid(θ["step_logits"])``: without the bound meta-learned step sizes drift into chaos.

The rule receives only inputs ``x``: no labels, and no gradient of the base model, so it trains networks
whose nonlinearity has zero derivative (``activation="step"``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from meta_rules.base_model import BaseParams, activation_fn, base_forward
from trainstep.core import TrainStep
from trainstep.runner import ConfigError

PyTree = Any
NUM_FEATURES = 12  # for each of z, h, δ: standardised, tanh(raw), batch mean (tanh), log batch spread
UPDATE_EPS = 1e-8
STAT_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class RuleConfig:
    """The shape of the rule and its step-size bound (static: it fixes θ's shapes).

    Attributes:
      hidden: width of the per-neuron network's two hidden layers.
      channels: length of the per-example vectors whose outer products give ``ΔW`` and ``ΔV``.
      max_step: upper bound on the step size (relative to the initial weight scale).
      decay_steps: if positive, step ``t`` is scaled by ``1 / (1 + t / decay_steps)`` (a fixed harmonic
        schedule, so that the base model settles instead of drifting at a constant rate); ``0``: constant.
    """

    hidden: int = 32
    channels: int = 4
    max_step: float = 0.1
    decay_steps: float = 0.0

    def __post_init__(self):
        for name in ("hidden", "channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"RuleConfig.{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.max_step, (int, float)) and math.isfinite(self.max_step) and self.max_step > 0):
            raise ConfigError(f"RuleConfig.max_step must be a positive finite number, got {self.max_step!r}")
        if not (isinstance(self.decay_steps, (int, float)) and math.isfinite(self.decay_steps)
                and self.decay_steps >= 0):
            raise ConfigError(f"RuleConfig.decay_steps must be a finite number >= 0, got {self.decay_steps!r}")

    @property
    def num_outputs(self) -> int:
        return 4 * self.channels + 2


DEFAULT_RULE_CONFIG = RuleConfig()


class RuleState(NamedTuple):
    """The inner state the rule evolves: a step counter and the base model's parameters."""

    step: jax.Array
    params: BaseParams


def theta_shapes(config: RuleConfig) -> dict:
    """The shape of every leaf of θ for ``config`` (used to validate loaded θ)."""
    h, o = config.hidden, config.num_outputs
    return {
        "in": {"w": (NUM_FEATURES, h), "b": (h,)},
        "pool": {"w": (2 * h, h), "b": (h,)},
        "out": {"w": (h, o), "b": (o,)},
        "step_logits": (3,),
    }


def init_theta(key: jax.Array, config: RuleConfig = DEFAULT_RULE_CONFIG, *, step_logit: float = -1.0) -> dict:
    """Random meta-parameters θ (``N(0, 1/fan_in)`` weights, zero biases).

    Args:
      key: PRNG key.
      config: the rule's shape.
      step_logit: initial logit of the three step sizes (``W``, ``V``, ``b``).

    Example:
      >>> theta = init_theta(jax.random.key(0), RuleConfig(hidden=16))
      >>> theta["in"]["w"].shape
      (12, 16)
    """
    shapes = theta_shapes(config)
    keys = iter(jax.random.split(key, 3))
    theta = {}
    for name in ("in", "pool", "out"):
        fan_in = shapes[name]["w"][0]
        theta[name] = {"w": jax.random.normal(next(keys), shapes[name]["w"]) / jnp.sqrt(fan_in),
                       "b": jnp.zeros(shapes[name]["b"])}
    theta["step_logits"] = jnp.full((3,), step_logit, jnp.float32)
    return theta


def check_theta(theta: PyTree, config: RuleConfig) -> None:
    """Raises :class:`ConfigError` unless ``theta`` has exactly the structure and shapes ``config`` implies."""
    expected = theta_shapes(config)
    try:
        got = jax.tree.map(jnp.shape, theta)
    except Exception as e:  # noqa: BLE001 - any unflattenable input is a bad θ
        raise ConfigError(f"θ is not a pytree of arrays: {e}") from None
    if got != expected:
        raise ConfigError(f"θ does not match {config}: expected shapes {expected}, got {got}")


def _batch_stats(a_BN: jax.Array) -> tuple[jax.Array, jax.Array]:
    mean = jnp.mean(a_BN, axis=0, keepdims=True)
    std = jnp.sqrt(jnp.mean((a_BN - mean) ** 2, axis=0, keepdims=True) + STAT_EPS)
    return mean, std


def neuron_features(z_BN: jax.Array, h_BN: jax.Array, delta_BN: jax.Array) -> jax.Array:
    """Per-neuron, per-example inputs of the rule ``(B, n, 12)``, bounded whatever the layer's scale."""
    feats = []
    for a in (z_BN, h_BN, delta_BN):
        mean, std = _batch_stats(a)
        feats += [(a - mean) / std, jnp.tanh(a), jnp.broadcast_to(jnp.tanh(mean), a.shape),
                  jnp.broadcast_to(jnp.log(std), a.shape)]
    return jnp.stack(feats, axis=-1)


def neuron_network(theta: dict, feats_BNF: jax.Array) -> jax.Array:
    """The shared per-neuron network: features ``(B, n, F)`` to outputs ``(B, n, 4 * channels + 2)``.

    Its second layer also sees its first layer's activations averaged over the minibatch, so what a neuron
    emits for one example can depend on the whole batch.
    """
    h1 = jax.nn.relu(jnp.einsum("bnf,fh->bnh", feats_BNF, theta["in"]["w"]) + theta["in"]["b"][None, None, :])
    pooled = jnp.broadcast_to(jnp.mean(h1, axis=0, keepdims=True), h1.shape)
    h2 = jax.nn.relu(jnp.einsum("bnk,kh->bnh", jnp.concatenate([h1, pooled], axis=-1), theta["pool"]["w"])
                     + theta["pool"]["b"][None, None, :])
    return jnp.einsum("bnh,ho->bno", h2, theta["out"]["w"]) + theta["out"]["b"][None, None, :]


def _normalise_columns(d: jax.Array) -> jax.Array:
    """Each column scaled to root-mean-square ``1/sqrt(fan_in)``, the scale of the initial weights."""
    fan_in = d.shape[0]
    rms = jnp.sqrt(jnp.mean(d ** 2, axis=0, keepdims=True) + UPDATE_EPS)
    return d / (rms * math.sqrt(fan_in))


def step_sizes(theta: dict, config: RuleConfig) -> jax.Array:
    """The bounded step sizes ``(3,)`` of ``W``, ``V`` and ``b``, each in ``(0, max_step)``."""
    return config.max_step * jax.nn.sigmoid(theta["step_logits"])


def rule_updates(theta: dict, params: BaseParams, x_BD: jax.Array, *, config: RuleConfig,
                 activation: str = "relu", normalize: bool = True) -> BaseParams:
    """The rule's normalised updates for one unlabelled minibatch (before the step size).

    Args:
      theta: meta-parameters.
      params: base-model parameters.
      x_BD: unlabelled inputs.
      config: the rule's shape.
      activation, normalize: the base model's nonlinearity and batch norm (see
        :func:`meta_rules.base_model.base_forward`).

    Returns:
      Updates with the structure of ``params`` (``{"w", "b", "v"}`` per layer).
    """
    pre, post = base_forward(params, x_BD, activation=activation, normalize=normalize)
    k = config.channels
    num_layers = len(params)
    top = pre[-1]
    mean, std = _batch_stats(top)
    delta = (top - mean) / std  # at the top the signal comes from the activations themselves
    outs = [None] * (num_layers + 1)
    for i in range(num_layers, -1, -1):
        outs[i] = neuron_network(theta, neuron_features(pre[i], post[i], delta))
        if i > 0:
            delta = outs[i][..., 4 * k] @ params[i - 1]["v"]  # sent down through V, not Wᵀ
    updates = []
    batch = x_BD.shape[0]
    for i in range(1, num_layers + 1):
        below, here = outs[i - 1], outs[i]
        c_w, c_v = here[..., 0:k], here[..., k:2 * k]
        d_w, d_v = below[..., 2 * k:3 * k], below[..., 3 * k:4 * k]
        dw = jnp.einsum("bjk,bik->ji", d_w, c_w) / batch
        dv = jnp.einsum("bik,bjk->ij", c_v, d_v) / batch
        db = jnp.mean(here[..., 4 * k + 1], axis=0)
        db = db / jnp.sqrt(jnp.mean(db ** 2) + UPDATE_EPS)
        updates.append({"w": _normalise_columns(dw), "b": db, "v": _normalise_columns(dv)})
    return tuple(updates)


def apply_updates(params: BaseParams, updates: BaseParams, sizes_wvb: jax.Array) -> BaseParams:
    """``params + step * updates`` with one step size each for ``w``, ``v`` and ``b``."""
    return tuple({"w": p["w"] + sizes_wvb[0] * u["w"], "v": p["v"] + sizes_wvb[1] * u["v"],
                  "b": p["b"] + sizes_wvb[2] * u["b"]} for p, u in zip(params, updates, strict=True))


def make_rule_step(config: RuleConfig = DEFAULT_RULE_CONFIG, *, activation: str = "relu",
                   normalize: bool = True) -> TrainStep:
    """The learned rule as a :class:`trainstep.TrainStep` whose ``hparams`` are θ.

    ``init(params)`` returns a :class:`RuleState`; ``step(state, x, theta, key)`` takes one unlabelled
    minibatch ``x`` ``(B, D)`` (``B >= 2``: the rule uses batch statistics) and returns the new state and
    metrics ``update_rms`` (root-mean-square of the applied weight change) and ``step_size_w``. The key is
    unused: the rule is deterministic given the batch.

    Args:
      config: the rule's shape.
      activation: the base model's nonlinearity (any of :data:`meta_rules.base_model.ACTIVATIONS`; a rule
        meta-trained with one may be applied with another).
      normalize: batch-normalise the base model's pre-activations.

    Example:
      >>> rule = make_rule_step(RuleConfig(hidden=16), activation="step")
      >>> state = rule.init(init_base_mlp(jax.random.key(0), (64, 32)))
      >>> state, m = trainstep.unroll(rule, state, theta, key=k, num_steps=100, batch_fn=batch_fn)
    """
    if not isinstance(config, RuleConfig):
        raise ConfigError(f"config must be a RuleConfig, got {type(config).__name__}")
    activation_fn(activation)

    def init(params: BaseParams, hparams: PyTree = None) -> RuleState:
        del hparams
        return RuleState(step=jnp.zeros((), jnp.int32), params=params)

    def step(state: RuleState, x_BD: jax.Array, theta: dict, key: jax.Array):
        del key
        if not isinstance(x_BD, jax.Array) and not hasattr(x_BD, "shape"):
            raise ConfigError(f"the rule's batch is an array of unlabelled inputs (B, D), got {type(x_BD).__name__}")
        if x_BD.ndim != 2 or x_BD.shape[0] < 2:
            raise ConfigError(f"the rule needs a batch (B, D) with B >= 2 (it uses batch statistics), "
                              f"got shape {x_BD.shape}")
        updates = rule_updates(theta, state.params, x_BD, config=config, activation=activation,
                               normalize=normalize)
        sizes = step_sizes(theta, config)
        if config.decay_steps > 0:
            sizes = sizes / (1.0 + state.step.astype(sizes.dtype) / config.decay_steps)
        params = apply_updates(state.params, updates, sizes)
        sq = sum(jnp.sum((sizes[0] * u["w"]) ** 2) for u in updates)
        count = sum(u["w"].size for u in updates)
        metrics = {"update_rms": jnp.sqrt(sq / count), "step_size_w": sizes[0]}
        return RuleState(state.step + 1, params), metrics

    return TrainStep(init=init, step=step)
