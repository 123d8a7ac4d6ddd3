"""Local SGD beyond the convex case: an MLP on MNIST-1D trained by ``K`` workers.

:func:`run_mlp_sweep` trains the same network under several communication schedules with the
same samples (common random numbers: worker ``w`` of seed ``s`` draws the same minibatch at step
``t`` whatever the schedule), so differences in test accuracy come from communication alone.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from comm_sgd.parallel import fetch, parallel_local_sgd, schedule_batch_fn, worker_output
from comm_sgd.schedules import parse_schedule
from trainstep.core import TrainStep, gradient_step
from trainstep.data import load_dataset
from trainstep.models import MLP, classification_loss, evaluate_classifier
from trainstep.runner import ConfigError, downsample_curve, run_chunked, write_results


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    dataset: str = "mnist1d"
    workers: int = 8
    steps: int = 3000
    batch: int = 16
    lr: float = 0.1
    momentum: float = 0.9
    hidden: tuple = (100, 100)
    seeds: int = 3
    seed: int = 0
    sampling: str = "iid"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def run_mlp_sweep(config: MLPConfig, schedules: Sequence[str], *, out_dir: Optional[str] = None,
                  progress: bool = True, checkpoint_every: Optional[int] = None) -> dict:
    """Trains ``config`` once per schedule (seeds vectorised); returns (and with ``out_dir``
    writes to ``out_dir/results.json``) test accuracy against communications.

    Each schedule's checkpoints live in ``out_dir/runs/<schedule>/``, so an interrupted sweep
    resumes where it stopped.
    """
    if not schedules:
        raise ConfigError("give at least one schedule")
    parsed = [parse_schedule(s) for s in schedules]  # bad specs fail before any work
    if config.sampling not in ("iid", "shards"):
        raise ConfigError(f"sampling must be 'iid' or 'shards', got {config.sampling!r}")
    data = load_dataset(config.dataset, val_fraction=0.0)
    K, b, S, T = config.workers, config.batch, config.seeds, config.steps
    n = len(data.y_train)
    if b > n:
        raise ConfigError(f"--batch {b} exceeds the {n} training examples")
    X = jnp.asarray(data.x_train, jnp.float32)
    Y = jnp.asarray(data.y_train, jnp.int32)
    if config.sampling == "shards":
        order = np.argsort(data.y_train, kind="stable")
        shard = n // K
        shards = jnp.asarray(order[: shard * K].reshape(K, shard), jnp.int32)

        def worker_batch_fn(key, t, worker):
            idx = shards[worker, jax.random.randint(key, (b,), 0, shard)]
            return X[idx], Y[idx]
    else:
        def worker_batch_fn(key, t, worker):
            idx = jax.random.randint(key, (b,), 0, n)
            return X[idx], Y[idx]

    model = MLP(hidden=tuple(config.hidden), num_outputs=data.num_classes)
    inner = gradient_step(classification_loss(model.apply), optax.sgd(config.lr, momentum=config.momentum or None))
    ps = parallel_local_sgd(inner, num_workers=K, worker_batch_fn=worker_batch_fn, average="last")

    def seeded_step(states, sched, hparams, key):
        keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(S))
        return jax.vmap(ps.step, in_axes=(0, None, None, 0))(states, sched, hparams, keys)

    step = TrainStep(init=ps.init, step=seeded_step)
    init_keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(config.seed), s))(jnp.arange(S))
    params = jax.vmap(lambda k: model.init(k, jnp.zeros((1, data.num_features), jnp.float32)))(init_keys)
    states = jax.vmap(lambda p: ps.init(inner.init(p)))(params)
    evaluate = jax.jit(jax.vmap(lambda p: evaluate_classifier(model.apply, p, data.x_test, data.y_test)))
    train_key = jax.random.fold_in(jax.random.key(config.seed), 10_000)

    results = {}
    for sched in parsed:
        mask = sched.mask(T)
        run_dir = None if out_dir is None else os.path.join(out_dir, "runs", _safe(sched.spec))
        run_config = {**dataclasses.asdict(config), "schedule": sched.spec}
        out = run_chunked(step, states, None, key=train_key, num_steps=T, batch_fn=schedule_batch_fn(mask),
                          out_dir=run_dir, config=run_config, chunk_size=checkpoint_every,
                          desc=f"MLP K={K} {sched.spec}", progress=progress)
        w = jax.vmap(worker_output)(out.state)
        ev = fetch(evaluate(w))
        acc = np.asarray(ev["accuracy"], np.float64)
        comms = int(mask.sum())
        results[sched.spec] = {
            "communications": comms,
            "bytes_all_reduced": float(np.asarray(out.history["bytes_all_reduced"]).sum(axis=0).max()),
            "test_accuracy": float(acc.mean()),
            "test_accuracy_std": float(acc.std()),
            "test_accuracy_per_seed": acc.tolist(),
            "test_loss": float(np.mean(ev["loss"])),
            "train_loss_curve": downsample_curve(np.asarray(out.history["loss"]).mean(axis=(1, 2))),
            "wall_s": out.wall_s,
        }
    summary = {"schedules": results, "data": data.summary()}
    if out_dir is not None:
        metrics = {k: {"communications": v["communications"], "test_accuracy": v["test_accuracy"]}
                   for k, v in results.items()}
        write_results(out_dir, dataclasses.asdict(config), metrics,
                      wall_s=sum(v["wall_s"] for v in results.values()), **summary)
    return summary
