"""An MLP on MNIST-1D (or digits) whose six regularisation hyperparameters a Self-Tuning Network
tunes: input dropout, two hidden dropouts, Gaussian input noise, weight decay and the magnitude of
a random-shift augmentation.

The same model trains three ways, each a ``trainstep.unroll`` of ``trainstep`` steps in one jitted call:

* :func:`train_fixed`: a plain network (no response weights) at fixed hyperparameters (the
  baselines: fixed values, grid, random search, optuna);
* :func:`train_stn`: STN or Delta-STN (:mod:`stn_jax.stn`), recording the hyperparameter schedule;
* :func:`train_schedule`: a plain network under a recorded schedule (STN's schedule replayed).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stn_jax.hparams import HParam, HParamSpace
from stn_jax.layers import GENERAL, best_response_dense, init_best_response_dense
from stn_jax.regularizers import dropout, gaussian_noise, random_shift
from stn_jax.stn import STNConfig, make_stn
from trainstep.core import TrainStep, gradient_step, unroll
from trainstep.data import Dataset, load_dataset, minibatch_fn
from trainstep.runner import ConfigError, NonFiniteLossError

DROPOUTS = ("input_dropout", "dropout1", "dropout2")


def mlp_space(init: Optional[dict] = None) -> HParamSpace:
    """The six hyperparameters, with their ranges and (overridable) initial values."""
    v = {"input_dropout": 0.05, "dropout1": 0.05, "dropout2": 0.05, "input_noise": 0.05,
         "weight_decay": 1e-4, "shift": 0.05, **(init or {})}
    return HParamSpace([
        HParam("input_dropout", v["input_dropout"], "range", 0.0, 0.95),
        HParam("dropout1", v["dropout1"], "range", 0.0, 0.95),
        HParam("dropout2", v["dropout2"], "range", 0.0, 0.95),
        HParam("input_noise", v["input_noise"], "log"),
        HParam("weight_decay", v["weight_decay"], "log", perturb="batch"),
        HParam("shift", v["shift"], "range", 0.0, 0.5),
    ])


# Search ranges of the black-box baselines (constrained values; log-uniform where marked): light to
# moderate regularisation, the region where a short run's best settings lie (STN's starting point,
# 0.05 dropout and noise, 1e-4 weight decay, 0.05 shift, is inside), so that a 10-trial search is a
# real baseline rather than mostly over-regularised draws.
SEARCH_SPACE = {
    "input_dropout": (0.0, 0.5, False),
    "dropout1": (0.0, 0.5, False),
    "dropout2": (0.0, 0.5, False),
    "input_noise": (1e-3, 0.3, True),
    "weight_decay": (1e-6, 1e-2, True),
    "shift": (0.0, 0.3, False),
}


@dataclasses.dataclass(frozen=True)
class MLPSetup:
    """Model and training budget shared by STN and the baselines."""

    dataset: str = "mnist1d"
    hidden: tuple = (100, 100)
    batch: int = 100
    steps: int = 6000  # weight steps of one plain training run
    lr: float = 1e-3
    val_fraction: float = 0.2


def _regularise(x, hv, key, train):
    if not train:
        return x
    k1, k2, k3 = jax.random.split(key, 3)
    x = random_shift(k1, x, hv["shift"])
    x = gaussian_noise(k2, x, hv["input_noise"])
    return dropout(k3, x, hv["input_dropout"])


def init_params(key: jax.Array, num_features: int, num_classes: int, hidden, n_hparams: int) -> list:
    sizes = [num_features, *hidden, num_classes]
    keys = jax.random.split(key, len(sizes) - 1)
    return [init_best_response_dense(k, a, b, n_hparams) for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def predict(params, x, h, hv, key, train):
    """The STN network: best-response layers, regularisers at the per-example values ``hv``."""
    k_in, *k_drop = jax.random.split(key, len(params))
    z = _regularise(x, hv, k_in, train)
    for i, layer in enumerate(params):
        z = best_response_dense(layer, z, h)
        if i < len(params) - 1:
            z = jax.nn.relu(z)
            if train and i < 2:
                z = dropout(k_drop[i], z, hv[DROPOUTS[i + 1]])
    return z


def predict_plain(params, x, hv, key, train):
    """The plain network (general weights only) at hyperparameter values ``hv``."""
    k_in, *k_drop = jax.random.split(key, len(params))
    z = _regularise(x, hv, k_in, train)
    for i, layer in enumerate(params):
        g = layer[GENERAL]
        z = z @ g["kernel"] + g["bias"][None, :]
        if i < len(params) - 1:
            z = jax.nn.relu(z)
            if train and i < 2:
                z = dropout(k_drop[i], z, hv[DROPOUTS[i + 1]])
    return z


def cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def weight_decay_penalty(params, h, hv):
    wd = hv["weight_decay"]
    wd = wd[0] if jnp.ndim(wd) else wd
    return 0.5 * wd * sum(jnp.sum(jnp.square(layer[GENERAL]["kernel"])) for layer in params)


def load_data(setup: MLPSetup) -> Dataset:
    data = load_dataset(setup.dataset, val_fraction=setup.val_fraction)
    if len(data.y_val) == 0:
        raise ConfigError("STN needs a validation split: val_fraction must be > 0")
    return data


def evaluate(logits_fn, params, data: Dataset) -> dict:
    out = {}
    for split in ("val", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        logits = logits_fn(params, x)
        out[f"{split}_loss"] = float(jnp.mean(cross_entropy(logits, y)))
        out[f"{split}_accuracy"] = float(jnp.mean(jnp.argmax(logits, -1) == y))
    return out


def plain_step(setup: MLPSetup, schedule_fn) -> TrainStep:
    """The plain network's Adam step; its batch is ``(x, y, t)`` and its hyperparameters are
    ``schedule_fn(hparams, t)`` (constrained values; scalars, broadcast over the batch)."""

    def loss_fn(params, batch, hparams, key):
        x, y, t = batch
        hv = schedule_fn(hparams, t)
        hv_b = {k: jnp.broadcast_to(v, (x.shape[0],)) for k, v in hv.items()}
        logits = predict_plain(params, x, hv_b, key, True)
        return jnp.mean(cross_entropy(logits, y)) + weight_decay_penalty(params, None, hv), {}

    return gradient_step(loss_fn, optax.adam(setup.lr))


def _fixed_values(hparams, t):
    del t
    return hparams


def _replay_values(hparams, t):
    return {k: v[t] for k, v in hparams.items()}


def _run_program(program, state, args, num_steps: int, *, progress: bool, desc: str):
    """Runs ``program(state, args, offset, n) -> (state, metrics)`` (jitted, ``n`` static) over steps
    ``[0, num_steps)`` in one call; returns the final state and the metrics (numpy).

    One call per run (per phase for STN), not chunks: a chunk would rebuild the run's table of
    epoch permutations (:func:`trainstep.data.minibatch_fn`) and pay a dispatch and a transfer, an overhead that
    measured about as much as the 2,000 plain steps themselves on the MNIST-1D MLP and would make
    the plain run, the unit of cost, look slower than it is. The progress bar moves once, at the end.
    """
    from tqdm.auto import tqdm

    with tqdm(total=num_steps, desc=desc, disable=not progress, leave=False, dynamic_ncols=True,
              file=sys.stderr) as bar:
        state, metrics = program(state, args, jnp.asarray(0, jnp.int32), num_steps)
        metrics = jax.device_get(metrics)
        bar.update(num_steps)
    return state, {k: np.asarray(v) for k, v in metrics.items()}


# The compiled programs are cached per static configuration and take everything that depends on the
# seed (keys, initial state) and the data as arguments, so that the seeds of a comparison and the
# trials of equal-sized searches reuse one compilation instead of baking their keys and arrays into
# a program of their own.


@functools.lru_cache(maxsize=32)
def _plain_program(setup: MLPSetup, replay: bool, trials: Optional[int]):
    ts = plain_step(setup, _replay_values if replay else _fixed_values)
    step = ts.step if trials is None else jax.vmap(ts.step, in_axes=(0, None, 0, None))

    def program(state, args, offset, n):
        hparams, key, k_shuffle, x, y = args
        base = minibatch_fn((x, y), setup.batch, key=k_shuffle, num_steps=setup.steps)

        def batch_fn(k, t):
            xb, yb = base(k, t)
            return xb, yb, t

        state, metrics = unroll(step, state, hparams, key=key, num_steps=n, batch_fn=batch_fn, step_offset=offset)
        return state, {"loss": metrics["loss"]}

    return jax.jit(program, static_argnums=3)


def _plain_logits(params, x):
    return predict_plain(params, x, {}, jax.random.key(0), False)


@functools.lru_cache(maxsize=4)
def _plain_eval_program(batched: bool):
    return jax.jit(jax.vmap(_plain_logits, in_axes=(0, None)) if batched else _plain_logits)


def _train_plain(setup, data, hparams, replay, seed, progress, desc, trials=None):
    """One plain run, or with ``trials`` the same run vmapped over ``trials`` hyperparameter settings
    (``hparams`` leaves with a leading trials axis) sharing the seed: initial weights, minibatches
    and random draws are those of the unbatched run, so each trial equals its own plain run."""
    ts = plain_step(setup, _fixed_values)
    key = jax.random.key(seed)
    k_init, k_run, k_shuffle = jax.random.split(key, 3)
    params = init_params(k_init, data.num_features, data.num_classes, setup.hidden, len(mlp_space()))
    state = ts.init(params)
    if trials is not None:
        state = jax.tree.map(lambda a: jnp.broadcast_to(a, (trials, *jnp.shape(a))), state)
    args = (hparams, k_run, k_shuffle, jnp.asarray(data.x_train), jnp.asarray(data.y_train))
    start = time.perf_counter()
    state, history = _run_program(_plain_program(setup, replay, trials), state, args, setup.steps,
                                 progress=progress, desc=desc)
    wall = time.perf_counter() - start
    if trials is None:
        bad = ~np.isfinite(history["loss"])
        if bad.any():
            raise NonFiniteLossError(int(np.argmax(bad)))
        ev = evaluate(_plain_eval_program(False), state.params, data)
    else:  # a diverged trial keeps its non-finite losses; selection by validation loss passes it over
        ev = evaluate_batch(_plain_eval_program(True), state.params, data)
    return {**ev, "wall_s": wall}


def evaluate_batch(logits_fn, params, data: Dataset) -> dict:
    """:func:`evaluate` for a batch of networks: ``logits_fn`` returns ``(trials, n, classes)``;
    every metric is a numpy array ``(trials,)``."""
    out = {}
    for split in ("val", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        logits = logits_fn(params, x)
        out[f"{split}_loss"] = np.asarray(jnp.mean(cross_entropy(logits, jnp.asarray(y)[None, :]), axis=-1))
        out[f"{split}_accuracy"] = np.asarray(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y)[None, :], axis=-1))
    return out


def train_fixed(setup: MLPSetup, data: Dataset, values: dict, *, seed: int = 0, progress: bool = False) -> dict:
    """A plain run at fixed hyperparameter ``values`` (constrained; missing ones are 0)."""
    names = mlp_space().names
    hp = {k: jnp.asarray(float(values.get(k, 0.0)), jnp.float32) for k in names}
    return _train_plain(setup, data, hp, False, seed, progress, "fixed")


def train_fixed_batch(setup: MLPSetup, data: Dataset, values: dict, *, seed: int = 0,
                      progress: bool = False) -> dict:
    """Plain runs at several fixed settings at once, vmapped over the trials.

    Each trial equals :func:`train_fixed` at its values with the same ``seed`` (same initial
    weights, minibatches and random draws: common random numbers across trials).

    Args:
      values: ``{name: values of shape (trials,)}`` (constrained; missing names are 0).

    Returns:
      ``val_loss``, ``val_accuracy``, ``test_loss``, ``test_accuracy`` as arrays ``(trials,)`` and
      ``wall_s``, the wall time of the whole batch.

    Example:
      >>> r = train_fixed_batch(setup, data, {"dropout1": [0.1, 0.3], "shift": [0.0, 0.2]})
      >>> r["val_loss"].shape  # (2,)
    """
    names = mlp_space().names
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown hyperparameters {unknown}; expected some of {list(names)}")
    arrays = {k: np.asarray(v, np.float32) for k, v in values.items()}
    shapes = {np.shape(v) for v in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1 or next(iter(shapes))[0] < 1:
        raise ConfigError(f"values need one shape (trials,) with trials >= 1, got {sorted(shapes)}")
    (trials,) = next(iter(shapes))
    if not all(np.all(np.isfinite(v)) for v in arrays.values()):
        raise ConfigError("hyperparameter values must be finite")
    hp = {k: jnp.asarray(arrays.get(k, np.zeros(trials, np.float32))) for k in names}
    return _train_plain(setup, data, hp, False, seed, progress, f"fixed x{trials}", trials=trials)


def train_schedule(setup: MLPSetup, data: Dataset, schedule: dict, *, seed: int = 0, progress: bool = False) -> dict:
    """A plain run whose hyperparameters follow ``schedule``: ``{name: values per weight step}``
    (arrays of length ``setup.steps``)."""
    names = mlp_space().names
    hp = {k: jnp.asarray(np.asarray(schedule[k], np.float32)) for k in names}
    for k, v in hp.items():
        if v.shape != (setup.steps,):
            raise ConfigError(f"schedule[{k!r}] needs {setup.steps} values, got shape {v.shape}")
    return _train_plain(setup, data, hp, True, seed, progress, "replay")


@functools.lru_cache(maxsize=16)
def _stn_programs(setup: MLPSetup, init: tuple, delta: bool, linearize: bool, warmup: int, t_train: int,
                  t_val: int, hyper_lr: float, entropy_weight: float, tune_scales: bool, centre_at_init: bool):
    """The STN object and its jitted warm-up, cycle and prediction programs for one configuration
    (seed-dependent keys, the initial state and the data are arguments)."""
    space = mlp_space(dict(init))
    config = STNConfig(t_train=t_train, t_val=t_val, entropy_weight=entropy_weight, tune_scales=tune_scales,
                       delta=delta, linearize=linearize, centre_at_init=centre_at_init and not delta)
    stn = make_stn(space, predict, cross_entropy, penalty=weight_decay_penalty,
                   weight_optimizer=optax.adam(setup.lr), hyper_optimizer=optax.adam(hyper_lr), config=config)

    def train_fn(k_shuffle, x, y):
        return minibatch_fn((x, y), setup.batch, key=k_shuffle, num_steps=setup.steps)

    def warm(state, args, offset, n):
        key, k_shuffle, x, y = args
        state, metrics = unroll(stn.weight_step, state, None, key=key, num_steps=n,
                                batch_fn=train_fn(k_shuffle, x, y), step_offset=offset)
        return state, {"loss": metrics["loss"]}

    def cycle(state, args, offset, n):
        key, k_shuffle, x, y, k_val, x_val, y_val = args
        tf = train_fn(k_shuffle, x, y)
        vf = minibatch_fn((x_val, y_val), min(setup.batch, x_val.shape[0]), mode="iid")

        def cycle_batches(k, c):
            t0 = warmup + c * t_train
            tb = jax.vmap(lambda i: tf(jax.random.fold_in(k, i), t0 + i))(jnp.arange(t_train))
            vb = jax.vmap(lambda i: vf(jax.random.fold_in(k_val, c * t_val + i), c))(jnp.arange(t_val))
            return tb, vb

        return unroll(stn.cycle_step, state, None, key=key, num_steps=n, batch_fn=cycle_batches, step_offset=offset)

    return (stn, jax.jit(warm, static_argnums=3), jax.jit(cycle, static_argnums=3),
            jax.jit(lambda s, x: stn.predict_at(s, x)))


def train_stn(setup: MLPSetup, data: Dataset, *, delta: bool = False, linearize: bool = False, seed: int = 0,
              init: Optional[dict] = None, warmup: int = 500, t_train: int = 5, t_val: int = 1,
              hyper_lr: float = 3e-3, entropy_weight: float = 1e-3, tune_scales: bool = True,
              centre_at_init: bool = True, progress: bool = False) -> dict:
    """STN (or Delta-STN) with ``setup.steps`` weight steps in all (``warmup`` of them before
    tuning starts), returning accuracies, the schedule and wall time.

    The schedule holds each hyperparameter's value at every weight step (for :func:`train_schedule`).

    ``centre_at_init`` (STN only; see :class:`stn_jax.STNConfig`): the hypernetwork sees the offset
    of the hyperparameters from their initial values. With the raw unconstrained values (``False``,
    the official code's input: ``log 1e-4 = -9.2`` for the weight decay) the response modulates
    every unit from the start and the same network at the same, untuned values lost about 8 points
    of MNIST-1D test accuracy against the plain network (64.6 % against 72.9 %, 3 seeds, 2,000 steps);
    centred, it is within a point of it.
    """
    space = mlp_space(init)
    if not 0 <= warmup < setup.steps:
        raise ConfigError(f"warmup must be in [0, {setup.steps}), got {warmup}")
    cycles = (setup.steps - warmup) // t_train
    init_key = tuple(sorted((init or {}).items()))
    stn, warm_program, cycle_program, predict_program = _stn_programs(
        setup, init_key, delta, linearize, warmup, t_train, t_val, float(hyper_lr), float(entropy_weight),
        tune_scales, centre_at_init)
    key = jax.random.key(seed)
    k_init, k_run, k_shuffle, k_val = jax.random.split(key, 4)
    params = init_params(k_init, data.num_features, data.num_classes, setup.hidden, len(space))
    state = stn.init(params)
    train = (k_shuffle, jnp.asarray(data.x_train), jnp.asarray(data.y_train))
    val = (k_val, jnp.asarray(data.x_val), jnp.asarray(data.y_val))

    start = time.perf_counter()
    if warmup:
        state, _ = _run_program(warm_program, state, (jax.random.fold_in(k_run, 0), *train), warmup,
                               progress=progress, desc="STN warm-up")
    state, history = _run_program(cycle_program, state, (jax.random.fold_in(k_run, 1), *train, *val), cycles,
                                 progress=progress, desc="Delta-STN" if delta else "STN")
    wall = time.perf_counter() - start
    bad = ~np.isfinite(history["loss"])
    if bad.any():
        raise NonFiniteLossError(int(np.argmax(bad)))
    ev = evaluate(predict_program, state, data)
    hist = {k[3:]: np.asarray(v) for k, v in history.items() if k.startswith("hp/")}
    init_vals = space.values(space.init_unconstrained())
    # Per weight step: the initial values through warm-up, then each cycle's values for its steps.
    schedule = {}
    for name in space.names:
        per_cycle = np.concatenate([[init_vals[name]], hist[name][:-1]])
        steps = np.concatenate([np.full(warmup, init_vals[name]), np.repeat(per_cycle, t_train)])
        tail = setup.steps - len(steps)
        schedule[name] = np.concatenate([steps, np.full(tail, hist[name][-1])]).astype(np.float32)
    final = {name: float(hist[name][-1]) for name in space.names}
    return {**ev, "wall_s": wall, "final_hparams": final, "schedule": schedule,
            "cycle_val_loss": np.asarray(history["val_loss"]), "cycles": cycles}
