"""Few-shot evaluation of representations on a labelled dataset: the learned rule against its baselines.

Every method turns a dataset's inputs ``X`` (standardised, labels unseen) into features of one width:

* ``rule``: a fresh base MLP trained by the learned rule for ``N`` steps on minibatches of ``X``;
* ``random``: the same MLP at initialisation (``N = 0``);
* ``autoencoder``: the same MLP as encoder with a linear decoder, trained with Adam for the same ``N``
  steps to reconstruct ``X`` (back-propagation; with a step activation only the decoder learns);
* ``pca``: projection on the top principal components of ``X`` (as many as the MLP's width, at most ``D``);
* ``raw``: ``X`` itself.

Each is scored by few-shot episodes: ``shots`` labelled examples per class (support) and ``queries``
others (query), drawn without overlap; readouts are ridge regression to one-hot labels (the
meta-objective's, :func:`meta_rules.readout.few_shot_ridge_accuracy`) and multinomial logistic
regression fitted by Adam on the support set. Base-network methods repeat over ``seeds`` initialisations,
every method over ``episodes`` episodes per seed; the figures are mean and spread over all of them.
Everything inside is a pure function of keys, vmapped over seeds and episodes, with ``lax.scan`` for
inner steps; :func:`evaluate_methods` is the driver that jits it piece by piece.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from meta_rules.base_model import BaseParams, activation_fn, check_sizes, init_base_mlp, representation
from meta_rules.readout import few_shot_ridge_accuracy, readout_features
from meta_rules.rule import RuleConfig, check_theta, make_rule_step
from trainstep.core import unroll
from trainstep.data import DataError, check_class_labels, check_features
from trainstep.runner import ConfigError

PyTree = Any
METHODS = ("rule", "random", "autoencoder", "pca", "raw")
READOUTS = ("ridge", "logistic")
STANDARDIZE_EPS = 1e-3


@dataclasses.dataclass(frozen=True)
class FewShotConfig:
    """How features are scored (static).

    Attributes:
      shots: labelled support examples per class, one evaluation per entry.
      queries: query examples per class and episode.
      episodes: episodes per seed.
      seeds: base-network initialisations (and autoencoder/rule minibatch streams).
      ridge_l2: penalty of the ridge readout (on unit-norm, centred features, as in meta-training).
      logistic_steps, logistic_lr, logistic_l2: Adam steps, learning rate and L2 penalty of the logistic
        readout (fitted on the same centred, unit-norm features plus a constant).
      batch_size: minibatch of the rule and the autoencoder.
      autoencoder_lr: Adam learning rate of the autoencoder.
    """

    shots: tuple = (10, 50)
    queries: int = 20
    episodes: int = 30
    seeds: int = 10
    ridge_l2: float = 0.1
    logistic_steps: int = 100
    logistic_lr: float = 0.1
    logistic_l2: float = 1e-3
    batch_size: int = 32
    autoencoder_lr: float = 1e-3

    def __post_init__(self):
        shots = (self.shots,) if isinstance(self.shots, int) else tuple(self.shots)
        object.__setattr__(self, "shots", shots)
        for name, value in [("shots", s) for s in shots] + [(n, getattr(self, n)) for n in (
                "queries", "episodes", "seeds", "logistic_steps", "batch_size")]:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"FewShotConfig.{name} must be a positive integer, got {value!r}")
        if not shots:
            raise ConfigError("FewShotConfig.shots is empty")
        if self.batch_size < 2:
            raise ConfigError(f"FewShotConfig.batch_size must be >= 2 (batch statistics), got {self.batch_size}")
        for name in ("ridge_l2", "logistic_lr", "autoencoder_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"FewShotConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.logistic_l2 >= 0:
            raise ConfigError(f"FewShotConfig.logistic_l2 must be >= 0, got {self.logistic_l2}")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A validated, standardised dataset: ``x`` ``(n, D)`` float32, ``y`` ``(n,)`` in ``[0, C)``, the class
    table ``(C, m)`` (``m`` examples of each class, in a fixed random order) and the original labels."""

    x: np.ndarray
    y: np.ndarray
    table: np.ndarray
    classes: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.table.shape[0])


def prepare_data(x, y, *, source: str = "data", min_per_class: int = 1) -> Prepared:
    """Validates ``x`` ``(n, D)`` and integer labels ``y`` ``(n,)``; standardises ``x`` per feature.

    Args:
      x, y: the dataset.
      source: its name, for error messages.
      min_per_class: examples each class needs (``shots + queries`` of the largest evaluation).

    Raises:
      DataError: non-numeric or non-finite ``x``, labels that are not integers or do not match ``x``,
        fewer than two classes, a class with too few examples.
    """
    x = check_features(x, source=source, key="X")
    y = check_class_labels(y, x.shape[0], source=source, key="y")
    classes, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"{source}: key 'y': needs at least two classes, found {len(classes)}")
    if counts.min() < min_per_class:
        raise DataError(f"{source}: key 'y': class {int(classes[np.argmin(counts)])} has {int(counts.min())} "
                        f"examples; an episode needs shots + queries = {min_per_class} per class")
    mean = x.mean(axis=0, keepdims=True)
    std = x.std(axis=0, keepdims=True) + STANDARDIZE_EPS
    m = int(counts.min())
    rng = np.random.default_rng(0)
    table = np.stack([rng.permutation(np.flatnonzero(y_idx == c))[:m] for c in range(len(classes))])
    return Prepared(((x - mean) / std).astype(np.float32), y_idx.astype(np.int32), table.astype(np.int32), classes)


def sample_episode(key: jax.Array, table_CM: jax.Array, shots: int, queries: int):
    """Indices of one episode: ``(support (C*shots,), y_support, query (C*queries,), y_query)``.

    Support and query are disjoint, each class drawn from its row of ``table_CM``.
    """
    c, m = table_CM.shape
    orders = jax.vmap(lambda k: jax.random.permutation(k, m)[:shots + queries])(jax.random.split(key, c))
    picked = jnp.take_along_axis(table_CM, orders, axis=1)
    labels = lambda n: jnp.repeat(jnp.arange(c, dtype=jnp.int32), n)
    return picked[:, :shots].reshape(-1), labels(shots), picked[:, shots:].reshape(-1), labels(queries)


def few_shot_logistic_accuracy(feats_support: jax.Array, y_support: jax.Array, feats_query: jax.Array,
                               y_query: jax.Array, num_classes: int, *, steps: int = 200, lr: float = 0.1,
                               l2: float = 1e-3) -> jax.Array:
    """Query accuracy of multinomial logistic regression fitted by ``steps`` Adam steps on the support set.

    The features are centred on the support mean and scaled to unit norm (plus a constant), as for
    the ridge readout; the loss is the mean cross-entropy plus ``l2/2 |W|^2``.
    """
    centre = jnp.mean(feats_support, axis=0)
    xs = readout_features(feats_support, centre)
    xq = readout_features(feats_query, centre)
    tx = optax.adam(lr)

    def loss(w):
        logits = xs @ w
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y_support)) \
            + 0.5 * l2 * jnp.sum(w ** 2)

    def body(carry, _):
        w, opt = carry
        g = jax.grad(loss)(w)
        upd, opt = tx.update(g, opt, w)
        return (optax.apply_updates(w, upd), opt), None

    w0 = jnp.zeros((xs.shape[1], num_classes), xs.dtype)
    (w, _), _ = jax.lax.scan(body, (w0, tx.init(w0)), None, length=steps)
    return jnp.mean((jnp.argmax(xq @ w, axis=1) == y_query).astype(jnp.float32))


def episode_scores(feats_ND: jax.Array, table_CM: jax.Array, key: jax.Array, *, shots: int,
                   config: FewShotConfig, logistic: bool = True) -> dict:
    """Ridge (and logistic) accuracy of features on ``config.episodes`` episodes: ``{"ridge": (E,), ...}``."""
    c = table_CM.shape[0]

    def one(k):
        s, ys, q, yq = sample_episode(k, table_CM, shots, config.queries)
        fs, fq = feats_ND[s], feats_ND[q]
        out = {"ridge": few_shot_ridge_accuracy(fs, ys, fq, yq, c, l2=config.ridge_l2)}
        if logistic:
            out["logistic"] = few_shot_logistic_accuracy(fs, ys, fq, yq, c, steps=config.logistic_steps,
                                                         lr=config.logistic_lr, l2=config.logistic_l2)
        return out

    return jax.vmap(one)(jax.random.split(key, config.episodes))


def score_features(feats_SND: jax.Array, table_CM: jax.Array, keys_S: jax.Array, *, shots: int, logistic: bool,
                   config: FewShotConfig) -> dict:
    """:func:`episode_scores` vmapped over seeds: features ``(S, n, P)`` and one key per seed give
    ``{"ridge": (S, E), "logistic": (S, E)}``.

    A pure function of arrays and static settings, so one ``jax.jit`` of it serves every method and
    every network of the same feature width (:func:`evaluate_methods` pads features with zero columns,
    which leave both readouts unchanged, to share it).
    """
    return jax.vmap(lambda f, k: episode_scores(f, table_CM, k, shots=shots, config=config,
                                                logistic=logistic))(feats_SND, keys_S)


def _pad_width(f: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([f, np.zeros(f.shape[:-1] + (width - f.shape[-1],), f.dtype)], axis=-1) \
        if f.shape[-1] < width else f


def _segments(steps: Sequence[int]) -> list[int]:
    steps = sorted(set(int(s) for s in steps))
    if not steps or steps[0] < 0:
        raise ConfigError(f"inner step counts must be non-negative integers, got {steps}")
    return steps


def _iid_batches(x_ND: jax.Array, batch_size: int):
    return lambda k, t: x_ND[jax.random.randint(k, (batch_size,), 0, x_ND.shape[0])]


def rule_trajectory(theta: dict, rule_config: RuleConfig, params: BaseParams, x_ND: jax.Array,
                    steps: Sequence[int], *, key: jax.Array, batch_size: int = 32, activation: str = "relu",
                    normalize: bool = True) -> list[BaseParams]:
    """The base model's parameters after each of ``steps`` (sorted, e.g. ``(0, 10, 100)``) rule steps.

    One run, in consecutive ``lax.scan`` segments; the minibatches of step ``t`` depend on ``(key, t)`` only.
    """
    rule = make_rule_step(rule_config, activation=activation, normalize=normalize)
    state, done, out = rule.init(params), 0, []
    for s in _segments(steps):
        if s > done:
            state, _ = unroll(rule, state, theta, key=key, num_steps=s - done,
                              batch_fn=_iid_batches(x_ND, batch_size), step_offset=done)
            done = s
        out.append(state.params)
    return out


def autoencoder_trajectory(params: BaseParams, x_ND: jax.Array, steps: Sequence[int], *, key: jax.Array,
                           batch_size: int = 32, learning_rate: float = 1e-3, activation: str = "relu",
                           normalize: bool = True) -> list[BaseParams]:
    """The encoder's parameters after each of ``steps`` Adam steps on reconstruction.

    The encoder is the base MLP (forward weights, same activation and batch norm); the decoder is linear,
    ``x̂ = h_L D + c`` (``D`` ``N(0, 1/n_L)``, ``c = 0``); the loss is the mean squared reconstruction error.
    """
    width = params[-1]["w"].shape[1]
    dim = x_ND.shape[1]
    dec = {"d": jax.random.normal(jax.random.fold_in(key, -1 % (2 ** 31)), (width, dim)) / jnp.sqrt(width),
           "c": jnp.zeros((dim,))}
    tx = optax.adam(learning_rate)
    enc = tuple({"w": p["w"], "b": p["b"]} for p in params)

    def loss(ae, x):
        e, d = ae
        full = tuple({**layer, "v": jnp.zeros(layer["w"].shape[::-1])} for layer in e)
        h = representation(full, x, activation=activation, normalize=normalize)
        return jnp.mean((h @ d["d"] + d["c"][None, :] - x) ** 2)

    def step(st, x, hp, k):
        del hp, k
        ae, opt = st
        value, g = jax.value_and_grad(loss)(ae, x)
        upd, opt = tx.update(g, opt, ae)
        return (optax.apply_updates(ae, upd), opt), {"loss": value}

    state, done, out = ((enc, dec), tx.init((enc, dec))), 0, []
    for s in _segments(steps):
        if s > done:
            state, _ = unroll(step, state, None, key=key, num_steps=s - done,
                              batch_fn=_iid_batches(x_ND, batch_size), step_offset=done)
            done = s
        out.append(tuple({**p, "w": e["w"], "b": e["b"]} for p, e in zip(params, state[0][0], strict=True)))
    return out


def pca_features(x_ND: np.ndarray, width: int) -> np.ndarray:
    """Projection of (centred) ``x`` on its top ``min(width, D)`` principal directions."""
    xc = x_ND - x_ND.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return (xc @ vt[:min(width, x_ND.shape[1])].T).astype(np.float32)


def summarize(acc: np.ndarray) -> dict:
    """``{"mean", "std", "seed_std", "n"}`` of accuracies ``(seeds, episodes)``: the spread over all of them
    and the spread of the per-seed means."""
    acc = np.asarray(acc, np.float64).reshape(acc.shape[0], -1)
    return {"mean": float(acc.mean()), "std": float(acc.std()), "seed_std": float(acc.mean(axis=1).std()),
            "n": int(acc.size)}


def evaluate_methods(theta: Optional[dict], rule_config: Optional[RuleConfig], x, y, *, hidden: Sequence[int],
                     activation: str = "relu", steps: int = 100, curve_steps: Sequence[int] = (),
                     config: FewShotConfig = FewShotConfig(), methods: Sequence[str] = METHODS,
                     key: jax.Array, normalize: bool = True, source: str = "data") -> dict:
    """Few-shot accuracy of every method on ``(x, y)``, and of ``rule``/``autoencoder`` along ``curve_steps``.

    Args:
      theta, rule_config: the learned rule (from :func:`meta_rules.load_theta`); needed for ``"rule"``.
      x, y: inputs ``(n, D)`` and integer labels ``(n,)`` (validated; ``x`` standardised per feature). The
        rule and the autoencoder train on all of ``x``, unlabelled; the episodes draw from it too.
      hidden: hidden widths of the base MLP (``(W,) * depth``); PCA keeps ``hidden[-1]`` components.
      activation: the base MLP's nonlinearity.
      steps: inner steps ``N`` of the rule and the autoencoder (``random`` is ``N = 0``).
      curve_steps: extra step counts at which the rule, the autoencoder and random features are scored by the
        ridge readout (for an accuracy-against-steps plot).
      config: the few-shot protocol.
      methods: a subset of :data:`METHODS`.
      key: PRNG key (base initialisations, minibatches, episodes).
      normalize: batch norm in the base MLP.
      source: the data's name in error messages.

    Returns:
      ``{"methods": {method: {readout: {str(shots): summary}}}, "curves": {method: {"step": [...],
      str(shots): [summary, ...]}}, "data": {...}}`` with summaries from :func:`summarize`.

    Raises:
      DataError: bad data. ConfigError: bad settings or θ.
    """
    if not isinstance(config, FewShotConfig):
        raise ConfigError(f"config must be a FewShotConfig, got {type(config).__name__}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown methods {unknown}: expected a subset of {list(METHODS)}")
    activation_fn(activation)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ConfigError(f"steps must be a non-negative integer, got {steps!r}")
    if "rule" in methods:
        if theta is None or rule_config is None:
            raise ConfigError("the 'rule' method needs theta and rule_config")
        check_theta(theta, rule_config)
    data = prepare_data(x, y, source=source, min_per_class=max(config.shots) + config.queries)
    sizes = check_sizes((data.x.shape[1],) + tuple(hidden))
    if config.batch_size > data.x.shape[0]:
        raise ConfigError(f"batch_size {config.batch_size} exceeds the {data.x.shape[0]} examples")
    x_dev, table = jnp.asarray(data.x), jnp.asarray(data.table)
    k_init, k_run, k_ep = jax.random.split(key, 3)
    seed_keys = jax.random.split(k_init, config.seeds)
    run_keys = jax.random.split(k_run, config.seeds)
    ep_keys = jax.random.split(k_ep, config.seeds)
    base_steps = _segments([0, steps, *curve_steps])
    feat = lambda p: representation(p, x_dev, activation=activation, normalize=normalize)

    def trajectories(method):
        def one(k_p, k_r):
            p0 = init_base_mlp(k_p, sizes)
            if method == "rule":
                ps = rule_trajectory(theta, rule_config, p0, x_dev, base_steps, key=k_r,
                                     batch_size=config.batch_size, activation=activation, normalize=normalize)
            else:
                ps = autoencoder_trajectory(p0, x_dev, base_steps, key=k_r, batch_size=config.batch_size,
                                            learning_rate=config.autoencoder_lr, activation=activation,
                                            normalize=normalize)
            return jnp.stack([feat(p) for p in ps])
        return jax.jit(jax.vmap(one))(seed_keys, run_keys)  # (seeds, len(base_steps), n, W)

    width = max(sizes[-1], data.x.shape[1])
    jitted = jax.jit(score_features, static_argnames=("shots", "logistic", "config"))
    score = lambda f, k, shots, logistic: jitted(jnp.asarray(_pad_width(np.asarray(f), width)), table, k,
                                                 shots=shots, logistic=logistic, config=config)
    results: dict = {"methods": {}, "curves": {}}
    trained = {}
    for method in ("rule", "autoencoder"):
        if method in methods or (method == "autoencoder" and "random" in methods and "rule" not in methods):
            trained[method] = np.asarray(trajectories(method))
    # Random features are step 0 of either trajectory (the same initialisation and the same features).
    source_traj = trained.get("rule", trained.get("autoencoder"))
    if source_traj is None and "random" in methods:
        source_traj = np.asarray(jax.jit(jax.vmap(lambda k: feat(init_base_mlp(k, sizes))[None]))(seed_keys))
    i_final = base_steps.index(steps)
    feats = {}
    if "rule" in methods:
        feats["rule"] = trained["rule"][:, i_final]
    if "random" in methods:
        feats["random"] = source_traj[:, 0]
    if "autoencoder" in methods:
        feats["autoencoder"] = trained["autoencoder"][:, i_final]
    if "pca" in methods:
        feats["pca"] = np.broadcast_to(pca_features(data.x, sizes[-1]), (config.seeds,) + (data.x.shape[0],
                                       min(sizes[-1], data.x.shape[1])))
    if "raw" in methods:
        feats["raw"] = np.broadcast_to(data.x, (config.seeds,) + data.x.shape)
    for method in methods:
        per = {r: {} for r in READOUTS}
        for shots in config.shots:
            out = score(feats[method], ep_keys, shots, True)
            for r in READOUTS:
                per[r][str(shots)] = summarize(np.asarray(out[r]))
        results["methods"][method] = per
    if curve_steps:
        for method, traj in trained.items():
            if method not in methods:
                continue
            curve = {"step": base_steps}
            for shots in config.shots:
                curve[str(shots)] = [
                    summarize(np.asarray(score(traj[:, i], ep_keys, shots, False)["ridge"]))
                    for i in range(len(base_steps))]
            results["curves"][method] = curve
    results["data"] = {"source": source, "n": int(data.x.shape[0]), "num_features": int(data.x.shape[1]),
                       "num_classes": data.num_classes, "per_class": int(data.table.shape[1])}
    results["setup"] = {"sizes": list(sizes), "activation": activation, "steps": int(steps),
                        "protocol": dataclasses.asdict(config)}
    return results
