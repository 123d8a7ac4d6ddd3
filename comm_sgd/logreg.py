"""L2-regularised logistic regression with local SGD: the setting of both papers' experiments.

The loss is ``f(w) = mean log(1 + exp(-y x.w)) + (l2/2) |w|^2`` (labels in {-1, +1}, no bias);
``f*`` comes from Newton's method to 1e-10 (float64), so suboptimality ``f(w_out) - f*`` is exact
up to that tolerance. :func:`run_logreg` runs several seeds at once (``vmap`` over seeds around the
workers' ``vmap`` or ``shard_map``) through ``trainstep.runner.run_chunked``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from comm_sgd.parallel import fetch, parallel_local_sgd, schedule_batch_fn
from comm_sgd.schedules import parse_schedule
from comm_sgd.step_sizes import AVERAGES, parse_step_size, stich_shift
from trainstep.core import TrainStep, gradient_step
from trainstep.data import (
    DataError,
    _require_keys,
    check_features,
    load_npz,
    logistic_loss,
    logistic_optimum,
    make_logistic_problem,
)
from trainstep.runner import ConfigError, run_chunked


@dataclasses.dataclass(frozen=True)
class LogregProblem:
    """A logistic-regression problem with its optimum.

    Attributes:
      X, y: features (n, d) float64 and labels (n,) in {-1, +1}.
      l2: the regularisation ``L`` (also the strong-convexity constant ``mu``).
      w_star, f_star: minimiser and minimum (Newton, 1e-10).
      smoothness: ``L_f = lambda_max(X^T X) / (4 n) + l2``.
      name: where the data came from.
    """

    X: np.ndarray
    y: np.ndarray
    l2: float
    w_star: np.ndarray
    f_star: float
    smoothness: float
    name: str

    @property
    def condition_number(self) -> float:
        return self.smoothness / self.l2

    def loss(self, w: np.ndarray) -> float:
        return logistic_loss(np.asarray(w, np.float64), self.X, self.y, self.l2)

    def suboptimality(self, w: np.ndarray) -> float:
        return self.loss(w) - self.f_star


def make_problem(X: np.ndarray, y: np.ndarray, l2: float, name: str = "data") -> LogregProblem:
    """Validates the data and solves for the optimum."""
    if not (math.isfinite(l2) and l2 > 0):
        raise ConfigError(f"--l2 must be > 0 (strong convexity, a unique optimum), got {l2}")
    X = check_features(X, source=name, key="X").astype(np.float64)
    y = np.asarray(y)
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise DataError(f"{name}: key 'y': expected shape ({X.shape[0]},) to match X, got {y.shape}")
    if not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{name}: key 'y': expected numeric labels in {{-1, +1}}, got dtype {y.dtype}")
    if not np.all(np.isfinite(y)):
        raise DataError(f"{name}: key 'y': has non-finite values")
    bad = ~np.isin(y, (-1, 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{name}: key 'y': labels must be -1 or +1, got {y[i]!r} at index {i}")
    y = y.astype(np.float64)
    w_star, f_star = logistic_optimum(X, y, l2)
    lam = float(np.linalg.eigvalsh(X.T @ X / X.shape[0])[-1])
    return LogregProblem(X, y, float(l2), w_star, float(f_star), lam / 4.0 + l2, name)


def load_problem(path: str, l2: float) -> LogregProblem:
    """Reads ``X`` (n, d) and ``y`` (n,) in {-1, +1} from an ``.npz`` file."""
    arrays = load_npz(path, required=("X", "y"))
    _require_keys(str(path), arrays, ("X", "y"))
    return make_problem(arrays["X"], arrays["y"], l2, name=str(path))


def synthetic_problem(n: int, d: int, scale: float, l2: float, *, seed: int = 0) -> LogregProblem:
    """The synthetic problem of ``trainstep.data.make_logistic_problem``."""
    if n < 1 or d < 1 or not scale > 0:
        raise ConfigError(f"--synthetic needs n >= 1, d >= 1 and scale > 0, got {n},{d},{scale}")
    p = make_logistic_problem(n, d, scale, l2=l2, seed=seed)
    return make_problem(p.X, p.y, l2, name=f"synthetic({n},{d},{scale:g})")


@dataclasses.dataclass(frozen=True)
class LogregConfig:
    """One local-SGD run on a logistic-regression problem (``seeds`` runs vectorised)."""

    workers: int = 4
    steps: int = 1000
    batch: int = 1
    schedule: str = "every"
    lr: str = "stich"
    average: str = "stich"
    seeds: int = 1
    sampling: str = "iid"
    opt_state: str = "average"
    seed: int = 0

    def validate(self) -> None:
        for name in ("workers", "steps", "batch", "seeds"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {v!r}")
        if self.average not in AVERAGES:
            raise ConfigError(f"--average must be one of {', '.join(AVERAGES)}, got {self.average!r}")
        if self.sampling not in ("iid", "shards"):
            raise ConfigError(f"--sampling must be 'iid' or 'shards', got {self.sampling!r}")
        parse_schedule(self.schedule)


def _longest_period(mask: np.ndarray) -> int:
    ends = np.flatnonzero(mask) + 1
    return int(np.max(np.diff(np.concatenate([[0], ends]))))


def build_run(problem: LogregProblem, config: LogregConfig, *, mesh=None):
    """The pieces of a run: ``(step over seeds, initial states, batch_fn, mask, info)``.

    The step maps ``config.seeds`` independent runs (seed ``s`` uses key ``fold_in(key, s)``)
    over the workers' local SGD step.
    """
    config.validate()
    n, d = problem.X.shape
    K, b = config.workers, config.batch
    mask = parse_schedule(config.schedule).mask(config.steps)
    shift = stich_shift(problem.condition_number, _longest_period(mask))
    schedule = parse_step_size(config.lr, mu=problem.l2, a=shift)
    X = jnp.asarray(problem.X, jnp.float32)
    Y = jnp.asarray(problem.y, jnp.float32)
    l2 = problem.l2

    if config.sampling == "shards":
        if n < K:
            raise ConfigError(f"--sampling shards needs at least one example per worker ({n} < {K})")
        # Heterogeneous workers: contiguous blocks of the data sorted by label.
        order = np.argsort(problem.y, kind="stable")
        shard = n // K
        shards = jnp.asarray(order[: shard * K].reshape(K, shard), jnp.int32)

        def worker_batch_fn(key, t, worker):
            j = jax.random.randint(key, (b,), 0, shard)
            idx = shards[worker, j]
            return X[idx], Y[idx]
    else:
        def worker_batch_fn(key, t, worker):
            idx = jax.random.randint(key, (b,), 0, n)
            return X[idx], Y[idx]

    def loss_fn(w, batch, hparams, key):
        x, y = batch
        return jnp.mean(jnp.logaddexp(0.0, -y * (x @ w))) + 0.5 * l2 * (w @ w)

    inner = gradient_step(loss_fn, optax.sgd(schedule), has_aux=False)
    ps = parallel_local_sgd(inner, num_workers=K, worker_batch_fn=worker_batch_fn, mesh=mesh,
                            average=config.average, average_shift=shift, opt_state=config.opt_state)
    S = config.seeds

    def seeded_step(states, sched, hparams, key):
        keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(S))
        return jax.vmap(ps.step, in_axes=(0, None, None, 0))(states, sched, hparams, keys)

    one = ps.init(inner.init(jnp.zeros((d,), jnp.float32)))
    states = jax.tree.map(lambda x: jnp.broadcast_to(x, (S,) + x.shape), one)
    info = {"shift_a": shift,
            "condition_number": problem.condition_number, "longest_period": _longest_period(mask)}
    return TrainStep(init=ps.init, step=seeded_step), states, schedule_batch_fn(mask), mask, info


def run_logreg(problem: LogregProblem, config: LogregConfig, *, mesh=None, out_dir: Optional[str] = None,
               run_config: Optional[dict] = None, chunk_size: Optional[int] = None, progress: bool = True,
               desc: str = "local SGD") -> dict:
    """Runs ``config`` and returns the measured results (host numpy / Python values).

    Returns a dict with ``communications``, ``bytes_all_reduced`` (by each worker, over the run),
    ``suboptimality``
    (mean over seeds), ``suboptimality_per_seed``, ``final_loss`` (mean), ``final_loss_per_seed``,
    ``w`` (seeds, d), ``loss_curve`` (training minibatch loss per step, mean over seeds and
    workers), ``wall_s`` and the run's constants (``shift_a``, ``condition_number``).
    """
    step, states, batch_fn, mask, info = build_run(problem, config, mesh=mesh)
    out = run_chunked(step, states, None, key=jax.random.key(config.seed), num_steps=config.steps,
                      batch_fn=batch_fn, out_dir=out_dir,
                      config=run_config if run_config is not None else dataclasses.asdict(config),
                      chunk_size=chunk_size, desc=desc, progress=progress)
    # The mean over workers (axis 1; axis 0 holds the seeds) is taken on the host in float64, in one
    # order whatever the backend: a device-side mean over a sharded worker axis is a partitioned
    # all-reduce whose summation order differs from one device's.
    w = fetch(out.state.average.params).astype(np.float64).mean(axis=1)
    comms = fetch(out.state.communications)
    losses = np.array([problem.loss(wi) for wi in w])
    sub = losses - problem.f_star
    n_comm = int(mask.sum())
    if not np.all(comms == n_comm):
        raise AssertionError(f"communication counter {comms} disagrees with the schedule's {n_comm}")
    return {
        "communications": n_comm,
        "bytes_all_reduced": float(np.asarray(out.history["bytes_all_reduced"]).sum(axis=0).max()),
        "suboptimality": float(np.mean(sub)),
        "suboptimality_per_seed": sub.tolist(),
        "final_loss": float(np.mean(losses)),
        "final_loss_per_seed": losses.tolist(),
        "f_star": problem.f_star,
        "w": w,
        "loss_curve": np.asarray(out.history["loss"]).mean(axis=tuple(range(1, out.history["loss"].ndim))),
        "wall_s": out.wall_s,
        **info,
    }
