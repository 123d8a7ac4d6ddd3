"""Does STN's hyperparameter *schedule* help? The schedule table of MacKay et al. (2019), for one
tuned hyperparameter of the MNIST-1D MLP (:mod:`stn_jax.mlp`), the others held at constants.

Because STN moves the hyperparameter during training, it produces a schedule. The paper's claim
(PTB, output dropout): STN beats the best fixed value a grid search finds, re-training from scratch
under the recorded schedule nearly matches STN, and holding STN's *final* value fixed is worse, so
the schedule itself helps and the perturbation noise alone does not explain it. The rows:

* ``stn``: STN tuning the one hyperparameter (from the declared initial value);
* ``replay``: a plain network trained from scratch under that run's recorded schedule;
* ``best_fixed``: the grid value with the lowest mean validation loss, trained plainly;
* ``best_fixed_perturbed``: the same value with STN's perturbation noise and no tuning
  (``u~ = u + sigma * eps`` in the unconstrained space, ``sigma`` STN's initial scale);
* ``final_fixed``: each STN run's final value held fixed from the start;
* an *initial-value sweep*: STN from several initial values, whose trajectories should meet.

Everything is vectorised: the runs of one row (seeds, grid values, initial values) are one
``jax.vmap`` over a pure training function, so a whole row compiles once and runs as one program.
The plain runs mirror :func:`stn_jax.mlp.train_schedule` (same keys, batches and initialisation:
``plain_runs`` of one seed equals it), and the STN runs mirror :func:`stn_jax.mlp.train_stn`.

Example:
  >>> from stn_jax.mlp import MLPSetup
  >>> study = run_schedule_study(MLPSetup(steps=3000), hparam="dropout1", seeds=3)
  >>> study["rows"]["stn"]["test_accuracy"], study["rows"]["best_fixed"]["test_accuracy"]
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from stn_jax.hparams import HParam, HParamSpace
from stn_jax.layers import GENERAL
from stn_jax.mlp import (
    MLPSetup,
    cross_entropy,
    init_params,
    load_data,
    mlp_space,
    predict,
    predict_plain,
    weight_decay_penalty,
)
from stn_jax.stn import STNConfig, make_stn
from trainstep.core import gradient_step, unroll
from trainstep.data import Dataset, minibatch_fn
from trainstep.runner import ConfigError

HPARAMS = mlp_space().names

# What the hyperparameters that are *not* tuned are held at (no regularisation but the tuned one).
DEFAULT_CONSTANTS = {"input_dropout": 0.0, "dropout1": 0.0, "dropout2": 0.0, "input_noise": 0.0,
                     "weight_decay": 0.0, "shift": 0.0}

# Grids of the fixed-value baseline: strictly inside each hyperparameter's range (so that the
# perturbed row can take the value to the unconstrained space), covering the search ranges of
# stn_jax.mlp.SEARCH_SPACE.
GRIDS = {
    "input_dropout": (0.05, 0.2, 0.35, 0.5, 0.65, 0.8),
    "dropout1": (0.05, 0.2, 0.35, 0.5, 0.65, 0.8),
    "dropout2": (0.05, 0.2, 0.35, 0.5, 0.65, 0.8),
    "input_noise": (1e-3, 4e-3, 0.016, 0.063, 0.25, 1.0),
    "weight_decay": (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    "shift": (0.025, 0.1, 0.175, 0.25, 0.325, 0.4),
}

# Initial values of the STN sweep; the first is the STN row's.
SWEEP_INITS = {
    "input_dropout": (0.05, 0.4, 0.75),
    "dropout1": (0.05, 0.4, 0.75),
    "dropout2": (0.05, 0.4, 0.75),
    "input_noise": (1e-3, 0.03, 1.0),
    "weight_decay": (1e-6, 1e-4, 1e-2),
    "shift": (0.02, 0.2, 0.4),
}


@dataclasses.dataclass(frozen=True)
class STNSettings:
    """How the STN rows train (the defaults of :func:`stn_jax.mlp.train_stn`).

    Attributes:
      warmup: weight steps before tuning starts (at the initial value).
      t_train, t_val: weight and hyper steps per cycle.
      hyper_lr: Adam step size of the hyperparameter and its perturbation scale.
      entropy_weight: ``tau``, the weight of the perturbation's entropy.
      init_scale: the initial perturbation scale ``sigma`` (unconstrained space); also the noise of
        the ``best_fixed_perturbed`` row.
      delta, linearize: Delta-STN.
    """

    warmup: int = 500
    t_train: int = 5
    t_val: int = 1
    hyper_lr: float = 3e-3
    entropy_weight: float = 1e-3
    init_scale: float = 0.5
    delta: bool = False
    linearize: bool = False

    def __post_init__(self):
        if self.warmup < 0:
            raise ConfigError(f"warmup must be >= 0, got {self.warmup}")
        for name in ("hyper_lr", "init_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be finite and > 0, got {v}")
        self.stn_config()  # t_train, t_val, entropy_weight, delta/linearize

    def cycles(self, steps: int) -> int:
        """STN cycles in a budget of ``steps`` weight steps (``ConfigError`` if none fit)."""
        if not 0 <= self.warmup < steps:
            raise ConfigError(f"warmup must be in [0, {steps}), got {self.warmup}")
        cycles = (steps - self.warmup) // self.t_train
        if cycles < 1:
            raise ConfigError(f"{steps} steps leave no STN cycle after a warm-up of {self.warmup}")
        return cycles

    def stn_config(self) -> STNConfig:
        return STNConfig(t_train=self.t_train, t_val=self.t_val, entropy_weight=self.entropy_weight,
                         delta=self.delta, linearize=self.linearize)


def check_hparam(name: str) -> HParam:
    """The declaration of ``name`` in :func:`stn_jax.mlp.mlp_space` (``ConfigError`` if unknown)."""
    decl = {h.name: h for h in mlp_space().hparams}
    if name not in decl:
        raise ConfigError(f"unknown hyperparameter {name!r}; valid: {', '.join(HPARAMS)}")
    return decl[name]


def single_space(name: str, init: float, init_scale: float = 0.5) -> HParamSpace:
    """A space with the one hyperparameter ``name`` (its range and perturbation as in
    :func:`stn_jax.mlp.mlp_space`) starting at ``init``."""
    return HParamSpace([dataclasses.replace(check_hparam(name), init=float(init), init_scale=float(init_scale))])


def check_constants(constants: Optional[dict], tuned: str) -> dict:
    """The constants of the untuned hyperparameters (defaults filled in), validated."""
    constants = {**DEFAULT_CONSTANTS, **(constants or {})}
    unknown = sorted(set(constants) - set(HPARAMS))
    if unknown:
        raise ConfigError(f"unknown hyperparameters {unknown}; valid: {', '.join(HPARAMS)}")
    for k, v in constants.items():
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"constant {k} must be finite and >= 0, got {v}")
    constants.pop(tuned)
    return {k: float(v) for k, v in constants.items()}


def _with_constants(hv: dict, constants: dict, b: int) -> dict:
    return {**{k: jnp.full((b,), v, jnp.float32) for k, v in constants.items()}, **hv}


def unconstrain(h: HParam, v: jax.Array) -> jax.Array:
    """The inverse of ``h.constrain`` on arrays (``HParam.to_unconstrained`` on Python floats)."""
    if h.constraint == "range":
        p = (v - h.low) / (h.high - h.low)
        return jnp.log(p) - jnp.log1p(-p)
    if h.constraint == "positive":
        return v + jnp.log(-jnp.expm1(-v))
    if h.constraint == "log":
        return jnp.log(v)
    return v


# ---------------------------------------------------------------------------------------------
# Plain runs (vectorised): fixed values, schedules, with or without perturbation noise


def plain_run_fn(setup: MLPSetup, data: Dataset, hparam: str, constants: dict):
    """A pure ``run(values, sigma, seed) -> metrics`` training a plain network.

    ``values`` ``(steps,)``: the tuned hyperparameter at every weight step (constrained);
    ``sigma``: perturbation noise (unconstrained space; ``0`` for none); ``seed``: an int32.
    Keys, initialisation and batches are those of :func:`stn_jax.mlp.train_schedule`. Vectorise
    with ``jax.vmap`` over any of the three. Returns ``{val_loss, val_accuracy, test_loss,
    test_accuracy, final_train_loss}``.
    """
    h = check_hparam(hparam)
    constants = check_constants(constants, hparam)
    n_full = len(mlp_space())
    x_tr, y_tr = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

    def loss_fn(params, batch, hp, key):
        x, y, t = batch
        b = x.shape[0]
        value = hp["values"][t]
        if h.perturb == "batch":
            eps = jnp.broadcast_to(jax.random.normal(jax.random.fold_in(key, 7), (1,)), (b,))
        else:
            eps = jax.random.normal(jax.random.fold_in(key, 7), (b,))
        noisy = h.constrain(unconstrain(h, value) + hp["sigma"] * eps)
        # Exactly ``value`` without noise (the round trip through the unconstrained space is not exact).
        tuned = jnp.where(hp["sigma"] > 0, noisy, jnp.broadcast_to(value, (b,)))
        hv = _with_constants({hparam: tuned}, constants, b)
        logits = predict_plain(params, x, hv, key, True)
        return jnp.mean(cross_entropy(logits, y)) + weight_decay_penalty(params, None, hv), {}

    ts = gradient_step(loss_fn, optax.adam(setup.lr))

    def run(values, sigma, seed):
        k_init, k_run, k_shuffle = jax.random.split(jax.random.key(seed), 3)
        params = init_params(k_init, data.num_features, data.num_classes, setup.hidden, n_full)
        params = [{GENERAL: layer[GENERAL]} for layer in params]  # a plain network: no response weights
        base = minibatch_fn((x_tr, y_tr), setup.batch, key=k_shuffle, num_steps=setup.steps)
        batch_fn = lambda k, t: (*base(k, t), t)
        hp = {"values": jnp.asarray(values, jnp.float32), "sigma": jnp.asarray(sigma, jnp.float32)}
        state, m = unroll(ts, ts.init(params), hp, key=k_run, num_steps=setup.steps, batch_fn=batch_fn)
        ev = _evaluate(lambda x: predict_plain(state.params, x, {}, jax.random.key(0), False), data)
        return {**ev, "final_train_loss": jnp.mean(m["loss"][-100:])}

    return run


def _evaluate(logits_fn, data: Dataset) -> dict:
    out = {}
    for split in ("val", "test"):
        x, y = jnp.asarray(getattr(data, f"x_{split}")), jnp.asarray(getattr(data, f"y_{split}"))
        logits = logits_fn(x)
        out[f"{split}_loss"] = jnp.mean(cross_entropy(logits, y))
        out[f"{split}_accuracy"] = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
    return out


def plain_runs(setup: MLPSetup, data: Dataset, hparam: str, values, seeds, *, sigma=0.0,
               constants: Optional[dict] = None) -> dict:
    """Plain runs, one per row: ``values`` ``(R, steps)`` (or ``(R,)`` fixed values), ``seeds``
    ``(R,)``, ``sigma`` scalar or ``(R,)``. One jitted ``vmap``; returns numpy arrays ``(R,)``."""
    values = np.asarray(values, np.float32)
    seeds = np.asarray(seeds, np.int32)
    if values.ndim == 1:
        values = np.repeat(values[:, None], setup.steps, axis=1)
    r = len(seeds)
    if values.shape != (r, setup.steps):
        raise ConfigError(f"need values of shape ({r}, {setup.steps}) or ({r},), got {values.shape}")
    sigma = np.broadcast_to(np.asarray(sigma, np.float32), (r,))
    run = plain_run_fn(setup, data, hparam, constants or {})
    out = jax.jit(jax.vmap(run))(values, sigma, seeds)
    return {k: np.asarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# STN runs (vectorised over seeds and initial values)


def stn_run_fn(setup: MLPSetup, data: Dataset, hparam: str, constants: dict, settings: STNSettings = STNSettings()):
    """A pure ``run(init_u, seed) -> outputs`` of STN tuning ``hparam`` alone.

    ``init_u``: the initial value in the unconstrained space; keys, warm-up and cycles as in
    :func:`stn_jax.mlp.train_stn`. Returns the evaluation at the final hyperparameter, ``final``
    (its value), ``trajectory`` (the value after each cycle), ``sigma`` (the scale after each
    cycle), ``cycle_val_loss`` and ``schedule`` (the value at each of the ``setup.steps`` weight
    steps, for :func:`plain_runs`).
    """
    constants = check_constants(constants, hparam)
    h = check_hparam(hparam)
    space = single_space(hparam, h.init, settings.init_scale)
    cycles = settings.cycles(setup.steps)
    t_train, t_val, warmup = settings.t_train, settings.t_val, settings.warmup

    def predict_one(params, x, hh, hv, key, train):
        return predict(params, x, hh, _with_constants(hv, constants, x.shape[0]), key, train)

    def penalty_one(params, hh, hv):
        b = jax.tree.leaves(hv)[0].shape[0]
        return weight_decay_penalty(params, hh, _with_constants(hv, constants, b))

    stn = make_stn(space, predict_one, cross_entropy, penalty=penalty_one, weight_optimizer=optax.adam(setup.lr),
                   hyper_optimizer=optax.adam(settings.hyper_lr), config=settings.stn_config())
    x_tr, y_tr = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_va, y_va = jnp.asarray(data.x_val), jnp.asarray(data.y_val)

    def run(init_u, seed):
        k_init, k_run, k_shuffle, k_val = jax.random.split(jax.random.key(seed), 4)
        params = init_params(k_init, data.num_features, data.num_classes, setup.hidden, 1)
        state = stn.init(params)
        u0 = jnp.reshape(jnp.asarray(init_u, jnp.float32), (1,))
        state = state._replace(hyper=state.hyper._replace(params={**state.hyper.params, "u": u0}))
        train_fn = minibatch_fn((x_tr, y_tr), setup.batch, key=k_shuffle, num_steps=setup.steps)
        val_fn = minibatch_fn((x_va, y_va), min(setup.batch, len(data.y_val)), mode="iid")
        if warmup:
            state, _ = unroll(stn.weight_step, state, None, key=jax.random.fold_in(k_run, 0), num_steps=warmup,
                              batch_fn=train_fn)

        def cycle_batches(k, c):
            t0 = warmup + c * t_train
            tb = jax.vmap(lambda i: train_fn(jax.random.fold_in(k, i), t0 + i))(jnp.arange(t_train))
            vb = jax.vmap(lambda i: val_fn(jax.random.fold_in(k_val, c * t_val + i), c))(jnp.arange(t_val))
            return tb, vb

        state, m = unroll(stn.cycle_step, state, None, key=jax.random.fold_in(k_run, 1), num_steps=cycles,
                          batch_fn=cycle_batches)
        ev = _evaluate(lambda x: stn.predict_at(state, x), data)
        traj = m[f"hp/{hparam}"]
        init_v = h.constrain(u0[0])
        per_cycle = jnp.concatenate([init_v[None], traj[:-1]])
        sched = jnp.concatenate([jnp.full((warmup,), init_v), jnp.repeat(per_cycle, t_train)])
        sched = jnp.concatenate([sched, jnp.full((setup.steps - sched.shape[0],), traj[-1])])
        return {**ev, "final": traj[-1], "trajectory": traj, "sigma": m["sigma"][:, 0],
                "cycle_val_loss": m["val_loss"], "schedule": sched}

    return run


def stn_runs(setup: MLPSetup, data: Dataset, hparam: str, inits, seeds, *, constants: Optional[dict] = None,
             settings: STNSettings = STNSettings()) -> dict:
    """STN runs, one per row: ``inits`` ``(R,)`` initial values (constrained), ``seeds`` ``(R,)``.
    One jitted ``vmap``; returns numpy arrays with a leading axis ``R``."""
    h = check_hparam(hparam)
    init_u = np.asarray([h.to_unconstrained(float(v)) for v in np.asarray(inits, np.float64)], np.float32)
    run = stn_run_fn(setup, data, hparam, constants or {}, settings)
    out = jax.jit(jax.vmap(run))(init_u, np.asarray(seeds, np.int32))
    return {k: np.asarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# The study


def _summary(per_seed: dict, **extra) -> dict:
    out = dict(extra)
    for k in ("val_loss", "val_accuracy", "test_loss", "test_accuracy"):
        v = np.asarray(per_seed[k], np.float64)
        out[k] = float(v.mean())
        out[f"{k}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    out["per_seed"] = [{k: float(per_seed[k][i]) for k in ("val_loss", "val_accuracy", "test_loss",
                                                           "test_accuracy")} for i in range(len(per_seed["val_loss"]))]
    return out


def _pick(out: dict, idx) -> dict:
    return {k: v[idx] for k, v in out.items()}


def run_schedule_study(setup: Optional[MLPSetup] = None, data: Optional[Dataset] = None, *, hparam: str = "dropout1",
                       seeds: int = 3, grid: Optional[Sequence[float]] = None,
                       inits: Optional[Sequence[float]] = None, constants: Optional[dict] = None,
                       settings: STNSettings = STNSettings(), log=None) -> dict:
    """The schedule table for one tuned hyperparameter (see the module docstring).

    Args:
      setup: model and budget (default :class:`stn_jax.mlp.MLPSetup`); every row trains ``setup.steps``
        weight steps.
      data: the dataset (default :func:`stn_jax.mlp.load_data`).
      hparam: the tuned hyperparameter, one of :data:`HPARAMS`.
      seeds: seeds ``0 .. seeds-1`` of every row.
      grid: the fixed values of the grid search (default :data:`GRIDS`; at least 2).
      inits: STN's initial values (default :data:`SWEEP_INITS`); the first is the ``stn`` row's.
      constants: values of the untuned hyperparameters (default :data:`DEFAULT_CONSTANTS`).
      settings: STN's settings.
      log: ``log(message)`` for progress (default: silent).

    Returns:
      A JSON-ready dict: ``rows`` (name to mean/std of validation loss/accuracy and test
      loss/accuracy and per-seed values), ``grid``, ``init_sweep`` (trajectories per initial value
      and seed), ``targets`` (per metric: does each claim hold for the means), ``paired``
      (per-seed differences between rows), ``wall_s`` per stage and ``wall_s_per_run``.

    Raises:
      ConfigError: an unknown hyperparameter, grid or initial values outside its range
        (:class:`~stn_jax.hparams.HParamError`), ``seeds < 1``, a warm-up that leaves no cycle;
        all checked before any data is loaded.
    """
    setup = setup if setup is not None else MLPSetup()
    h = check_hparam(hparam)
    constants = check_constants(constants, hparam)
    grid = tuple(float(v) for v in (grid if grid is not None else GRIDS[hparam]))
    inits = tuple(float(v) for v in (inits if inits is not None else SWEEP_INITS[hparam]))
    if seeds < 1:
        raise ConfigError(f"seeds must be >= 1, got {seeds}")
    if len(grid) < 2 or len(inits) < 1:
        raise ConfigError("need at least 2 grid values and 1 initial value")
    for v in (*grid, *inits):
        h.to_unconstrained(v)  # inside the hyperparameter's range (HParamError otherwise)
    settings.cycles(setup.steps)
    log = log or (lambda msg: None)
    data = data if data is not None else load_data(setup)
    seed_ids = np.arange(seeds)
    wall = {}

    # 1. STN from each initial value, every seed: one program.
    t0 = time.perf_counter()
    n_i = len(inits)
    stn = stn_runs(setup, data, hparam, np.repeat(inits, seeds), np.tile(seed_ids, n_i), constants=constants,
                   settings=settings)
    wall["stn_sweep"] = time.perf_counter() - t0
    log(f"STN from {n_i} initial values x {seeds} seeds: {wall['stn_sweep']:.1f}s")
    main = _pick(stn, slice(0, seeds))  # the first initial value is the STN row

    # 2. The grid search, plain networks at fixed values.
    t0 = time.perf_counter()
    n_g = len(grid)
    g = plain_runs(setup, data, hparam, np.repeat(grid, seeds), np.tile(seed_ids, n_g), constants=constants)
    wall["grid"] = time.perf_counter() - t0
    log(f"grid of {n_g} values x {seeds} seeds: {wall['grid']:.1f}s")
    g_val = g["val_loss"].reshape(n_g, seeds)
    best_i = int(np.argmin(g_val.mean(axis=1)))  # chosen on validation loss only
    best = grid[best_i]

    # 3. Replay, best fixed value with STN's perturbation noise, STN's final value held fixed.
    t0 = time.perf_counter()
    sched = main["schedule"]
    finals = main["final"]
    vals = np.concatenate([sched, np.full((seeds, setup.steps), best, np.float32),
                           np.repeat(finals[:, None], setup.steps, axis=1)])
    sig = np.concatenate([np.zeros(seeds), np.full(seeds, settings.init_scale), np.zeros(seeds)])
    rest = plain_runs(setup, data, hparam, vals, np.tile(seed_ids, 3), sigma=sig, constants=constants)
    wall["replay_and_fixed"] = time.perf_counter() - t0
    log(f"replay, perturbed best, final fixed x {seeds} seeds: {wall['replay_and_fixed']:.1f}s")

    rows = {
        "stn": _summary(main, value=f"schedule from {inits[0]:g}", final_value=[float(v) for v in finals]),
        "replay": _summary(_pick(rest, slice(0, seeds)), value="STN's schedule, per seed"),
        "best_fixed": _summary(_pick(g, slice(best_i * seeds, (best_i + 1) * seeds)), value=best),
        "best_fixed_perturbed": _summary(_pick(rest, slice(seeds, 2 * seeds)), value=best,
                                         sigma=settings.init_scale),
        "final_fixed": _summary(_pick(rest, slice(2 * seeds, 3 * seeds)), value=[float(v) for v in finals]),
    }
    grid_rows = [_summary(_pick(g, slice(i * seeds, (i + 1) * seeds)), value=v) for i, v in enumerate(grid)]
    traj = stn["trajectory"].reshape(n_i, seeds, -1)
    final_by_init = stn["final"].reshape(n_i, seeds)
    u_final = np.asarray(unconstrain(h, jnp.asarray(final_by_init)))
    u_init = np.asarray([h.to_unconstrained(v) for v in inits])
    sweep = {
        "inits": list(inits),
        "cycle_weight_steps": (settings.warmup + settings.t_train * np.arange(1, traj.shape[-1] + 1)).tolist(),
        "trajectories": traj.tolist(),  # [init][seed][cycle]
        "sigma": stn["sigma"].reshape(n_i, seeds, -1)[:, :, -1].tolist(),
        "final_values": final_by_init.tolist(),
        "runs": [_summary(_pick(stn, slice(i * seeds, (i + 1) * seeds)), value=v) for i, v in enumerate(inits)],
        # Do trajectories meet? Spread of the final values across initial values (per seed, in the
        # unconstrained space where STN moves them) against the spread of the initial values.
        "final_spread_over_initial_spread": float(np.mean(np.ptp(u_final, axis=0)) / np.ptp(u_init))
        if n_i > 1 else None,
    }
    targets = {metric: {
        "stn_at_least_best_fixed": _better_or_equal(rows["stn"], rows["best_fixed"], metric),
        "replay_at_least_best_fixed": _better_or_equal(rows["replay"], rows["best_fixed"], metric),
        "final_fixed_worse_than_stn": not _better_or_equal(rows["final_fixed"], rows["stn"], metric),
        "final_fixed_worse_than_replay": not _better_or_equal(rows["final_fixed"], rows["replay"], metric),
    } for metric in METRICS}
    # Every row trains seed i from the same initial weights and minibatches, so per-seed
    # differences (a paired comparison) are less noisy than the rows' means and stds.
    paired = {f"{a}-{b}": {m: _paired(rows[a], rows[b], m) for m in METRICS} for a, b in PAIRS}
    return {"hparam": hparam, "constants": constants, "setup": dataclasses.asdict(setup),
            "settings": dataclasses.asdict(settings), "seeds": seeds, "data": data.summary(),
            "rows": rows, "grid": {"values": list(grid), "runs": grid_rows, "best_index": best_i, "best": best},
            "init_sweep": sweep, "targets": targets, "paired": paired, "wall_s": wall,
            # Per run, compilation included (a row's runs are one program).
            "wall_s_per_run": {"stn": wall["stn_sweep"] / (n_i * seeds), "plain": wall["grid"] / (n_g * seeds)}}


METRICS = ("val_loss", "test_loss", "test_accuracy")
PAIRS = (("stn", "best_fixed"), ("replay", "best_fixed"), ("final_fixed", "stn"), ("final_fixed", "replay"))


def _paired(a: dict, b: dict, metric: str) -> dict:
    d = np.asarray([x[metric] - y[metric] for x, y in zip(a["per_seed"], b["per_seed"], strict=True)])
    return {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
            "per_seed": d.tolist()}


def _better_or_equal(a: dict, b: dict, metric: str) -> bool:
    """Row ``a`` at least as good as row ``b`` in mean ``metric`` (accuracy up, loss down)."""
    return bool(a[metric] >= b[metric]) if metric.endswith("accuracy") else bool(a[metric] <= b[metric])


# ---------------------------------------------------------------------------------------------
# Plots


ROW_LABELS = {"stn": "STN", "replay": "STN schedule replayed", "best_fixed": "best fixed (grid)",
              "best_fixed_perturbed": "best fixed + perturbation", "final_fixed": "STN's final value fixed"}


def plot_trajectories(study: dict, path: str) -> None:
    """The tuned hyperparameter against weight steps, one colour per STN initial value."""
    plt = _pyplot()
    sw = study["init_sweep"]
    steps = np.asarray(sw["cycle_weight_steps"])
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    for i, init in enumerate(sw["inits"]):
        for s, tr in enumerate(sw["trajectories"][i]):
            ax.plot(steps, tr, color=f"C{i}", alpha=0.8, lw=1.2, label=f"init {init:g}" if s == 0 else None)
    ax.axhline(study["grid"]["best"], color="k", ls=":", label=f"best fixed {study['grid']['best']:g}")
    ax.axvline(study["settings"]["warmup"], color="0.6", lw=0.8)
    if study["hparam"] in ("input_noise", "weight_decay"):
        ax.set_yscale("log")
    ax.set_xlabel("weight step")
    ax.set_ylabel(study["hparam"])
    ax.set_title(f"STN schedules of {study['hparam']} from {len(sw['inits'])} initial values "
                 f"({study['seeds']} seeds each)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rows(study: dict, path: str) -> None:
    """Bars of validation loss and test accuracy (mean ± std over seeds) for every row."""
    plt = _pyplot()
    names = list(ROW_LABELS)
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for ax, metric in zip(axes, ("val_loss", "test_accuracy"), strict=True):
        m = [study["rows"][n][metric] for n in names]
        s = [study["rows"][n][f"{metric}_std"] for n in names]
        ax.bar(range(len(names)), m, yerr=s, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), [ROW_LABELS[n] for n in names], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(metric.replace("_", " "))
        lo = min(a - b for a, b in zip(m, s, strict=True))
        hi = max(a + b for a, b in zip(m, s, strict=True))
        ax.set_ylim(lo - 0.15 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"schedule table: {study['hparam']}, mean ± std over {study['seeds']} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(study: dict) -> str:
    """The rows as a markdown table (mean ± std over seeds)."""
    lines = ["| row | value | validation loss | test loss | test accuracy (%) |", "|---|---|---|---|---|"]
    for name, label in ROW_LABELS.items():
        r = study["rows"][name]
        v = r["value"]
        v = f"{v:g}" if isinstance(v, float) else (
            "per seed: " + ", ".join(f"{x:.3g}" for x in v) if isinstance(v, list) else str(v))
        lines.append(f"| {label} | {v} | {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | "
                     f"{r['test_loss']:.4f} ± {r['test_loss_std']:.4f} | "
                     f"{100 * r['test_accuracy']:.1f} ± {100 * r['test_accuracy_std']:.1f} |")
    return "\n".join(lines)
