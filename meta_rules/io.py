"""Using a rule: save and load a meta-trained θ with its configuration, apply it to a user's MLP and data.

θ is stored as an ``.npz`` archive (one array per leaf, keys like ``theta/in/w``) with the
:class:`~meta_rules.rule.RuleConfig` and free-form metadata as JSON in the key ``config``; it loads without
pickle, and every problem (missing file or key, wrong shapes, bad JSON) raises a named error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from meta_rules.base_model import BaseParams, activation_fn, check_params
from meta_rules.rule import DEFAULT_RULE_CONFIG, RuleConfig, check_theta, make_rule_step, theta_shapes
from trainstep.core import unroll
from trainstep.data import DataError, load_npz, minibatch_fn
from trainstep.runner import ConfigError, to_jsonable

PyTree = Any
FORMAT = "meta_rules.theta/1"


def _flatten(tree: dict, prefix: str) -> dict:
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}/{name}"))
        else:
            out[f"{prefix}/{name}"] = np.asarray(value)
    return out


def save_theta(path: str, theta: dict, config: RuleConfig, *, metadata: Optional[dict] = None) -> None:
    """Writes θ, its :class:`RuleConfig` and ``metadata`` (JSON-able: base model, tasks, scores) atomically.

    Example:
      >>> save_theta("rule.npz", theta, RuleConfig(hidden=16), metadata={"activation": "relu"})
      >>> theta, config, metadata = load_theta("rule.npz")
    """
    check_theta(theta, config)
    header = {"format": FORMAT, "rule_config": dataclasses.asdict(config), "metadata": to_jsonable(metadata or {})}
    arrays = _flatten(theta, "theta")
    arrays["config"] = np.asarray(json.dumps(header))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_theta(path: str) -> tuple[dict, RuleConfig, dict]:
    """Reads what :func:`save_theta` wrote.

    Returns:
      ``(theta, rule_config, metadata)``.

    Raises:
      DataError: a missing or unreadable file, a missing key, a bad header.
      ConfigError: θ's shapes do not match the stored configuration.
    """
    source = str(path)
    arrays = load_npz(path, ["config"], optional=None)
    try:
        header = json.loads(str(arrays.pop("config")))
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
        config = RuleConfig(**header["rule_config"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{source}: key 'config': not a meta_rules θ header ({e})") from None
    theta: dict = {}
    for name, template in _flatten(jax.tree.map(np.zeros, theta_shapes(config),
                                             is_leaf=lambda x: isinstance(x, tuple)), "theta").items():
        if name not in arrays:
            raise DataError(f"{source}: missing key '{name}' (expected shape {template.shape} for {config})")
        node = theta
        *parents, leaf = name.split("/")[1:]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(arrays[name], jnp.float32)
        if not np.all(np.isfinite(arrays[name])):
            raise DataError(f"{source}: key '{name}': contains NaN or inf")
    check_theta(theta, config)
    return theta, config, header.get("metadata", {})


def apply_rule(theta: dict, params: BaseParams, x: jax.Array, *, num_steps: int, key: jax.Array,
               config: RuleConfig = DEFAULT_RULE_CONFIG, batch_size: int = 32, activation: str = "relu",
               normalize: bool = True) -> tuple[BaseParams, dict]:
    """Trains a user's MLP on unlabelled data with a learned rule for ``num_steps`` steps.

    Args:
      theta: the rule's meta-parameters (e.g. from :func:`load_theta`).
      params: base-model parameters: :func:`meta_rules.init_base_mlp`, or a plain MLP through
        :func:`meta_rules.with_backward_weights`. Any width and depth.
      x: unlabelled inputs ``(n, D)``, ``D`` the MLP's input size; standardise them as in meta-training.
      num_steps: rule steps.
      key: PRNG key (minibatches, drawn independently with replacement).
      config: the rule's shape (from :func:`load_theta`).
      batch_size: examples per step (``2 <= batch_size <= n``).
      activation, normalize: the MLP's nonlinearity and batch norm.

    Returns:
      ``(params, metrics)``: the trained parameters and the rule's per-step metrics.

    Raises:
      ConfigError: mismatched θ, parameters or data, non-finite data, bad sizes.

    Example:
      >>> theta, config, meta = load_theta("rule.npz")
      >>> params = init_base_mlp(jax.random.key(0), (x.shape[1], 64, 64))
      >>> params, m = jax.jit(lambda p: apply_rule(theta, p, x, num_steps=1000, key=k, config=config))(params)
    """
    check_theta(theta, config)
    sizes = check_params(params)
    activation_fn(activation)
    if jnp.ndim(x) != 2:
        raise ConfigError(f"x must be unlabelled inputs (n, D), got shape {jnp.shape(x)}")
    if jnp.shape(x)[1] != sizes[0]:
        raise ConfigError(f"x has {jnp.shape(x)[1]} features but the MLP's input size is {sizes[0]}")
    # numpy, not jnp: under jax.jit a jnp test of a closed-over concrete x would itself be traced
    if not isinstance(x, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(x))):
        raise ConfigError("x contains NaN or inf")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ConfigError(f"num_steps must be a non-negative integer, got {num_steps!r}")
    if not 2 <= batch_size <= jnp.shape(x)[0]:
        raise ConfigError(f"batch_size must be in [2, {jnp.shape(x)[0]}] (the rule uses batch statistics), "
                          f"got {batch_size}")
    rule = make_rule_step(config, activation=activation, normalize=normalize)
    batch_fn = minibatch_fn(jnp.asarray(x, jnp.float32), batch_size, mode="iid")
    state, metrics = unroll(rule, rule.init(params), theta, key=key, num_steps=num_steps, batch_fn=batch_fn)
    return state.params, metrics
