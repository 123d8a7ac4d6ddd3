"""Hyperparameter-search baselines for the MNIST-1D MLP, in the same harness as STN.

Every method trains the same network (:mod:`stn_jax.mlp`) on the same data split with the same
number of weight steps, selects by **validation loss** and reports the selected network's test loss
and accuracy:

* ``fixed``: one plain run at :data:`FIXED_VALUES` (STN's starting point, see below);
* ``grid``: a product grid over three groups of hyperparameters (:func:`grid_values`);
* ``random``: ``budget`` settings drawn from :data:`stn_jax.mlp.SEARCH_SPACE`, uniform or
  log-uniform (:func:`random_values`);
* ``optuna``: optuna's TPE sampler (optional dependency ``optuna``), asking for a batch of settings at
  a time (ask/tell with the constant liar) so that the search is a few vmapped programs instead of
  ``budget`` sequential compiles;
* ``stn``, ``delta-stn``: :func:`stn_jax.mlp.train_stn`;
* ``stn-frozen``: the control of STN's architecture: STN with a hyper step size of 0, i.e. the same
  best-response network, perturbation and warm-up, but the hyperparameters (and the perturbation
  scale) never move; STN's gain over it is what tuning adds, its gain over ``fixed`` what the
  best-response network and the perturbation add by themselves.

The trials of a search run as one vmapped program (:func:`stn_jax.mlp.train_fixed_batch`) with
common random numbers: every trial of seed ``s`` starts from the weights of the ``fixed`` run of
seed ``s`` and sees the same minibatches.

Cost, in plain-training-run units: a search costs its number of trials (``cost_runs``); STN and
Delta-STN cost their wall time divided by the wall time of the ``fixed`` run of the same seed in the
same process. Both walls include compilation; ``compile_s`` is the part of each wall that JAX spent
tracing, lowering and compiling (:class:`CompileClock`), so ``cost_runs_compute`` (the ratio with
compilation taken out) is reported as well, and ``wall_runs`` gives every method's wall in
plain-run units.

Example:
  >>> setup = MLPSetup(steps=3000)
  >>> data = load_data(setup)
  >>> ref = fixed_search(setup, data, seed=0)
  >>> rnd = random_search(setup, data, 10, seed=0)
  >>> stn = stn_method(setup, data, seed=0, reference=ref)
  >>> stn["test_accuracy"], stn["cost_runs"], rnd["test_accuracy"]
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Optional

import jax
import numpy as np

from stn_jax.mlp import SEARCH_SPACE, MLPSetup, mlp_space, train_fixed, train_fixed_batch, train_stn
from trainstep.data import Dataset
from trainstep.runner import ConfigError

METHODS = ("stn", "stn-frozen", "delta-stn", "random", "grid", "optuna", "fixed")
SEARCHES = ("random", "grid", "optuna")

# The fixed baseline sits at STN's starting point (the declared initial values of
# :func:`stn_jax.mlp.mlp_space`): light regularisation everywhere, what one would try first; STN's
# gain over it is what tuning adds.
FIXED_VALUES = mlp_space().values(mlp_space().init_unconstrained())

# The grid's groups, in priority order (see :func:`grid_values`).
GRID_GROUPS = ("dropout", "weight_decay", "augmentation")

SCHEDULE_POINTS = 200

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling while the context is open.

    Example:
      >>> with CompileClock() as clock:
      ...     train_fixed(setup, data, {})
      >>> clock.seconds
    """

    def __enter__(self) -> CompileClock:
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event in _COMPILE_EVENTS:
            self.seconds += float(duration)

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


# ---------------------------------------------------------------------------------------------
# The settings each search tries


def _interpolate(name: str, q: np.ndarray) -> np.ndarray:
    """Quantiles ``q`` in [0, 1] of a hyperparameter's search range (log scale where declared)."""
    low, high, log = SEARCH_SPACE[name]
    if log:
        return np.exp(np.log(low) + q * (np.log(high) - np.log(low))).astype(np.float32)
    return (low + q * (high - low)).astype(np.float32)


def grid_levels(budget: int) -> tuple[int, ...]:
    """Levels per group of :data:`GRID_GROUPS`: the largest product <= ``budget`` reached by adding a
    level to the group with the fewest (earlier groups first on ties), e.g. 10 -> (2, 2, 2), 27 ->
    (3, 3, 3), 2 -> (2, 1, 1)."""
    if budget < 1:
        raise ConfigError(f"the budget must be >= 1, got {budget}")
    levels = [1] * len(GRID_GROUPS)
    while True:
        i = int(np.argmin(levels))  # argmin takes the first of equal counts: priority order
        trial = levels.copy()
        trial[i] += 1
        if math.prod(trial) > budget:
            return tuple(levels)
        levels = trial


def grid_values(budget: int) -> dict:
    """A product grid of at most ``budget`` settings; a full grid over six hyperparameters is out of
    reach (two levels each is already 64 runs), so they move in three groups:

    * ``dropout``: the three dropout rates share one level;
    * ``weight_decay``: on its own, log scale;
    * ``augmentation``: the input noise (log scale) and the shift magnitude move together.

    A group with ``n`` levels takes the midpoints of ``n`` equal cells of its search range
    (quantiles ``(i + 1/2) / n``), so one level is the middle of the range and two levels are its
    quartiles. :func:`grid_levels` gives the number of levels.

    Returns:
      ``{name: array (trials,)}`` for all six hyperparameters.
    """
    levels = grid_levels(budget)
    axes = [(np.arange(n) + 0.5) / n for n in levels]
    qd, qw, qa = (g.ravel() for g in np.meshgrid(*axes, indexing="ij"))
    return {"input_dropout": _interpolate("input_dropout", qd), "dropout1": _interpolate("dropout1", qd),
            "dropout2": _interpolate("dropout2", qd), "input_noise": _interpolate("input_noise", qa),
            "weight_decay": _interpolate("weight_decay", qw), "shift": _interpolate("shift", qa)}


def random_values(budget: int, seed: int) -> dict:
    """``budget`` settings drawn independently from :data:`SEARCH_SPACE` (log-uniform where it says
    so), from a generator seeded by ``seed`` (and apart from the training seed's streams)."""
    if budget < 1:
        raise ConfigError(f"the budget must be >= 1, got {budget}")
    rng = np.random.default_rng([seed, 0x5EA8C4])
    return {name: _interpolate(name, rng.uniform(size=budget)) for name in mlp_space().names}


# ---------------------------------------------------------------------------------------------
# Running and selecting


def select_by_validation(val_loss) -> int:
    """Index of the lowest validation loss (non-finite losses never win, unless all are)."""
    v = np.asarray(val_loss, np.float64)
    return int(np.argmin(np.where(np.isfinite(v), v, np.inf)))


def best_so_far(val_loss) -> list:
    """The running minimum of the validation losses, trial by trial (non-finite ones skipped)."""
    v = np.asarray(val_loss, np.float64)
    return np.minimum.accumulate(np.where(np.isfinite(v), v, np.inf)).tolist()


def _metrics(r: dict, i: Optional[int] = None) -> dict:
    keys = ("val_loss", "val_accuracy", "test_loss", "test_accuracy")
    return {k: float(r[k] if i is None else r[k][i]) for k in keys}


def _search_result(values: dict, trials: dict, wall: float, compile_s: float, reference: Optional[dict]) -> dict:
    """The common record of a search: the trials in order, the chosen one, its cost."""
    n = len(trials["val_loss"])
    rows = [{"hparams": {k: float(v[i]) for k, v in values.items()}, **_metrics(trials, i)} for i in range(n)]
    best = select_by_validation(trials["val_loss"])
    out = {**_metrics(trials, best), "hparams": rows[best]["hparams"], "chosen_trial": best,
           "cost_runs": float(n), "wall_s": wall, "compile_s": compile_s,
           "best_so_far": best_so_far(trials["val_loss"]), "trials": rows}
    if reference is not None:
        out["wall_runs"] = wall / reference["wall_s"]
    return out


def run_trials(setup: MLPSetup, data: Dataset, values: dict, *, seed: int, progress: bool = False) -> tuple:
    """The settings ``values`` (``{name: (trials,)}``) as one vmapped program; returns
    ``(metrics per trial, wall seconds, compile seconds)``."""
    with CompileClock() as clock:
        start = time.perf_counter()
        r = train_fixed_batch(setup, data, values, seed=seed, progress=progress)
        wall = time.perf_counter() - start
    return r, wall, clock.seconds


def fixed_search(setup: MLPSetup, data: Dataset, *, seed: int, values: Optional[dict] = None,
                 progress: bool = False) -> dict:
    """One plain run at ``values`` (default :data:`FIXED_VALUES`): the ``fixed`` baseline, and the
    plain run whose wall time is the unit of cost."""
    values = dict(FIXED_VALUES if values is None else values)
    with CompileClock() as clock:
        start = time.perf_counter()
        r = train_fixed(setup, data, values, seed=seed, progress=progress)
        wall = time.perf_counter() - start
    return {**_metrics(r), "hparams": values, "cost_runs": 1.0, "wall_s": wall, "compile_s": clock.seconds,
            "wall_runs": 1.0, "best_so_far": [float(r["val_loss"])]}


def grid_search(setup: MLPSetup, data: Dataset, budget: int, *, seed: int, reference: Optional[dict] = None,
                progress: bool = False) -> dict:
    """Grid search (:func:`grid_values`), selected by validation loss."""
    values = grid_values(budget)
    r, wall, compile_s = run_trials(setup, data, values, seed=seed, progress=progress)
    out = _search_result(values, r, wall, compile_s, reference)
    out["levels"] = dict(zip(GRID_GROUPS, grid_levels(budget), strict=True))
    return out


def random_search(setup: MLPSetup, data: Dataset, budget: int, *, seed: int, reference: Optional[dict] = None,
                  progress: bool = False) -> dict:
    """Random search (:func:`random_values`), selected by validation loss."""
    values = random_values(budget, seed)
    r, wall, compile_s = run_trials(setup, data, values, seed=seed, progress=progress)
    return _search_result(values, r, wall, compile_s, reference)


def _import_optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("method 'optuna' needs the optional dependency optuna: pip install optuna "
                          "(or the project's [baselines] extra), or leave optuna out of --methods") from None
    return optuna


def optuna_available() -> bool:
    try:
        _import_optuna()
    except ConfigError:
        return False
    return True


def optuna_search(setup: MLPSetup, data: Dataset, budget: int, *, seed: int, batch_size: Optional[int] = None,
                  reference: Optional[dict] = None, progress: bool = False) -> dict:
    """Optuna's TPE over :data:`SEARCH_SPACE`, ``batch_size`` settings at a time.

    The first batch is TPE's random start-up (``n_startup_trials = batch_size``); each later batch is
    asked for at once (``constant_liar`` keeps its members apart), trained as one vmapped program,
    and told back. ``batch_size`` defaults to ``ceil(budget / 3)``: three programs for any budget.

    Raises:
      ConfigError: optuna is not installed.
    """
    optuna = _import_optuna()
    if budget < 1:
        raise ConfigError(f"the budget must be >= 1, got {budget}")
    batch_size = int(batch_size or math.ceil(budget / 3))
    if batch_size < 1:
        raise ConfigError(f"the optuna batch size must be >= 1, got {batch_size}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=batch_size, multivariate=True,
                                             constant_liar=True)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    dists = {name: optuna.distributions.FloatDistribution(low, high, log=log)
             for name, (low, high, log) in SEARCH_SPACE.items()}
    names = mlp_space().names
    values = {k: [] for k in names}
    trials = {k: [] for k in ("val_loss", "val_accuracy", "test_loss", "test_accuracy")}
    wall = compile_s = 0.0
    while len(trials["val_loss"]) < budget:
        n = min(batch_size, budget - len(trials["val_loss"]))
        start = time.perf_counter()  # the sampler's own time counts towards the wall as well
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            asked = [study.ask(dists) for _ in range(n)]
        batch = {k: np.asarray([t.params[k] for t in asked], np.float32) for k in names}
        r, _, c = run_trials(setup, data, batch, seed=seed, progress=progress)
        for t, v in zip(asked, r["val_loss"], strict=True):
            if np.isfinite(v):
                study.tell(t, float(v))
            else:
                study.tell(t, state=optuna.trial.TrialState.FAIL)
        wall += time.perf_counter() - start
        compile_s += c
        for k in names:
            values[k].extend(batch[k].tolist())
        for k in trials:
            trials[k].extend(np.asarray(r[k]).tolist())
    out = _search_result({k: np.asarray(v) for k, v in values.items()},
                         {k: np.asarray(v) for k, v in trials.items()}, wall, compile_s, reference)
    out["batch_size"] = batch_size
    return out


def stn_method(setup: MLPSetup, data: Dataset, *, seed: int, reference: dict, delta: bool = False,
               progress: bool = False, **stn_options) -> dict:
    """STN (``delta=False``) or linearised Delta-STN (``delta=True``), costed against the plain run
    ``reference`` (a :func:`fixed_search` result of the same seed, same process).

    Args:
      stn_options: passed to :func:`stn_jax.mlp.train_stn` (``warmup``, ``hyper_lr``,
        ``entropy_weight``, ``t_train``, ``init``, ...).

    Returns:
      The metrics at the final hyperparameters, ``cost_runs`` (wall / reference wall),
      ``cost_runs_compute`` (the same with both compile times taken out), the final values and the
      schedule at :data:`SCHEDULE_POINTS` weight steps.
    """
    with CompileClock() as clock:
        start = time.perf_counter()
        r = train_stn(setup, data, delta=delta, linearize=delta, seed=seed, progress=progress, **stn_options)
        wall = time.perf_counter() - start
    steps = np.unique(np.linspace(0, setup.steps - 1, SCHEDULE_POINTS).round().astype(int))
    schedule = {"step": steps.tolist(), **{k: np.asarray(v)[steps].tolist() for k, v in r["schedule"].items()}}
    ref_compute = reference["wall_s"] - reference["compile_s"]
    return {**_metrics(r), "hparams": r["final_hparams"], "cost_runs": wall / reference["wall_s"],
            "cost_runs_compute": (wall - clock.seconds) / ref_compute if ref_compute > 0 else float("nan"),
            "wall_runs": wall / reference["wall_s"], "wall_s": wall, "compile_s": clock.seconds,
            "schedule": schedule}


# ---------------------------------------------------------------------------------------------
# All methods, several seeds

SUMMARY_KEYS = ("val_loss", "val_accuracy", "test_loss", "test_accuracy", "cost_runs", "wall_s", "compile_s",
                "wall_runs")


def summarize(per_seed: list) -> dict:
    """Mean (and ``*_std``, sample standard deviation) over seeds of each metric, plus ``per_seed``."""
    out = {}
    keys = [k for k in (*SUMMARY_KEYS, "cost_runs_compute") if all(k in r for r in per_seed)]
    for k in keys:
        v = np.asarray([r[k] for r in per_seed], np.float64)
        out[k] = float(v.mean())
        out[f"{k}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return {**out, "per_seed": per_seed}


def compare(setup: MLPSetup, data: Dataset, *, methods=METHODS, seeds: int = 3, budget: int = 10,
            stn_options: Optional[dict] = None, optuna_batch: Optional[int] = None, progress: bool = False,
            log=None) -> dict:
    """Runs ``methods`` for seeds ``0 .. seeds - 1`` on one data split; returns ``{name: summary}``
    (:func:`summarize`) in the order of ``methods``.

    Per seed the plain ``fixed`` run comes first (it is the unit of cost, so it runs even when
    ``fixed`` is not among ``methods``); a short plain run before the first seed absorbs the
    compilations that later runs reuse (initialisers, data tables), so that no method pays them.
    ``log(line)`` receives a line per method and seed.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ConfigError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if "optuna" in methods:
        _import_optuna()
    stn_options = dict(stn_options or {})
    warm = dataclasses.replace(setup, steps=min(setup.steps, 20))
    train_fixed(warm, data, FIXED_VALUES, seed=0)
    runs = {m: [] for m in methods}
    for seed in range(seeds):
        reference = fixed_search(setup, data, seed=seed, progress=progress)
        for method in methods:
            if method == "fixed":
                r = reference
            elif method == "grid":
                r = grid_search(setup, data, budget, seed=seed, reference=reference, progress=progress)
            elif method == "random":
                r = random_search(setup, data, budget, seed=seed, reference=reference, progress=progress)
            elif method == "optuna":
                r = optuna_search(setup, data, budget, seed=seed, batch_size=optuna_batch, reference=reference,
                                  progress=progress)
            elif method == "stn-frozen":
                r = stn_method(setup, data, seed=seed, reference=reference, progress=progress,
                               **{**stn_options, "hyper_lr": 0.0})
            else:
                r = stn_method(setup, data, seed=seed, reference=reference, delta=method == "delta-stn",
                               progress=progress, **stn_options)
            runs[method].append({"seed": seed, **r})
            if log is not None:
                log(f"seed {seed} {method:>9}: val loss {r['val_loss']:.4f}, test acc {r['test_accuracy']:.4f}, "
                    f"cost {r['cost_runs']:.2f} runs, wall {r['wall_s']:.1f} s")
    return {m: summarize(rs) for m, rs in runs.items()}
