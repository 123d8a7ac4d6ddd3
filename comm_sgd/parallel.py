"""Running local SGD's workers: simulated with ``vmap`` on one device, or for real with
``shard_map`` on a device mesh (one process or several joined by ``jax.distributed``).

:func:`parallel_local_sgd` returns an ordinary ``trainstep`` step over the *stacked* worker states
(leading axis ``K``), so ``trainstep.unroll`` and the runner drive it like any other step, the
whole run being one ``lax.scan``. Its batch is ``SyncBatch(t, sync)`` from
:func:`schedule_batch_fn`: the global step index and the schedule's flag. Each worker draws its own
minibatch inside the step with ``worker_batch_fn(key, t, worker)``.

Keys: at step ``t`` the runner's step key ``k`` is split per worker as ``k_w = fold_in(k, w)``;
worker ``w`` samples with ``fold_in(k_w, 0)`` and steps with ``fold_in(k_w, 1)``, whatever the
backend, so the simulation and the mesh see the same randomness.

On a mesh of ``D`` devices, ``K`` must be a multiple of ``D``; each device runs ``K / D`` workers
(``vmap`` inside ``shard_map``). With one worker per device in one process the run equals the
simulation bit for bit. With several workers per device, the average is taken in two stages
(within a device, then across devices), and across processes the all-reduce (gloo on CPU) may add
in another order: the same values up to float rounding. With several workers per device the
shard_map's varying-axis check is switched off, because jax 0.10 cannot type collectives over a
``vmap`` axis nested in a ``shard_map``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from comm_sgd.local_sgd import LocalSGDState, SyncBatch, local_sgd
from trainstep.core import TrainStep
from trainstep.runner import ConfigError, to_host

PyTree = Any
WorkerBatchFn = Callable[[jax.Array, jax.Array, jax.Array], PyTree]

LOCAL_AXIS = "local_workers"


def schedule_batch_fn(mask) -> Callable[[jax.Array, jax.Array], SyncBatch]:
    """``batch_fn`` for ``trainstep.unroll``: step ``t`` gets ``SyncBatch(t, mask[t])``."""
    mask = jnp.asarray(np.asarray(mask, bool))

    def batch_fn(key, t):
        del key
        return SyncBatch(jnp.asarray(t, jnp.int32), mask[t])

    return batch_fn


def worker_mesh(num_workers: int, devices=None, axis_name: str = "workers") -> Mesh:
    """A 1-D mesh over ``devices`` (default: all, across processes) for ``num_workers`` workers.

    Raises:
      ConfigError: if ``num_workers`` is not a multiple of the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if num_workers < 1 or num_workers % len(devices):
        raise ConfigError(
            f"{num_workers} workers cannot be spread evenly over {len(devices)} devices: use a multiple of "
            f"{len(devices)} (or the vmap backend)")
    return Mesh(np.asarray(devices), (axis_name,))


def parallel_local_sgd(
    step: TrainStep,
    *,
    num_workers: int,
    worker_batch_fn: WorkerBatchFn,
    mesh: Optional[Mesh] = None,
    axis_name: str = "workers",
    **local_sgd_options,
) -> TrainStep:
    """Local SGD with ``num_workers`` workers as one ``trainstep`` step over stacked states.

    Args:
      step: the step every worker runs (e.g. ``trainstep.gradient_step(loss, optax.sgd(lr))``).
      num_workers: ``K``.
      worker_batch_fn: ``worker_batch_fn(key, t, worker) -> batch`` samples worker ``worker``'s
        minibatch at global step ``t`` (``worker`` is a traced int; index a data shard with it for
        heterogeneous workers, or ignore it for iid sampling from a shared pool).
      mesh: ``None`` simulates the workers with ``vmap`` on the default device; a mesh runs them
        with ``shard_map`` over its axis ``axis_name`` (see :func:`worker_mesh`).
      axis_name: the workers' axis name (the mesh axis for a mesh).
      **local_sgd_options: passed to :func:`comm_sgd.local_sgd` (``opt_state``,
        ``outer_optimizer``, ``average``, ``average_shift``, accessors).

    Returns:
      A :class:`TrainStep` whose ``init(inner_state)`` replicates one worker's state ``K`` times
      (sharded over the mesh when there is one) and whose ``step(states, SyncBatch(t, sync),
      hparams, key)`` runs one local step on every worker; its metrics have a trailing axis of
      size ``K``.
    """
    if not isinstance(num_workers, (int, np.integer)) or num_workers < 1:
        raise ConfigError(f"the number of workers must be a positive int, got {num_workers!r}")
    num_workers = int(num_workers)

    def worker_fn(local: TrainStep):
        def run(state: LocalSGDState, worker, sched: SyncBatch, hparams, key):
            k = jax.random.fold_in(key, worker)
            data = worker_batch_fn(jax.random.fold_in(k, 0), sched.data, worker)
            return local.step(state, SyncBatch(data, sched.sync), hparams, jax.random.fold_in(k, 1))
        return run

    if mesh is None:
        local = local_sgd(step, axis_name=axis_name, **local_sgd_options)
        run = worker_fn(local)

        def init(inner_state):
            one = local.init(inner_state)
            return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_workers,) + jnp.shape(x)), one)

        def parallel_step(states, sched, hparams, key):
            ids = jnp.arange(num_workers, dtype=jnp.int32)
            return jax.vmap(run, in_axes=(0, 0, None, None, None), axis_name=axis_name)(
                states, ids, sched, hparams, key)

        return TrainStep(init=init, step=parallel_step)

    if axis_name not in mesh.axis_names:
        raise ConfigError(f"the mesh has axes {mesh.axis_names}, not the workers' axis {axis_name!r}")
    num_devices = mesh.shape[axis_name]
    if num_workers % num_devices:
        raise ConfigError(
            f"{num_workers} workers cannot be spread evenly over the {num_devices} devices of mesh axis "
            f"{axis_name!r}: use a multiple of {num_devices}")
    per_device = num_workers // num_devices
    axes = (axis_name,) if per_device == 1 else (axis_name, LOCAL_AXIS)
    local = local_sgd(step, axis_name=axes, **local_sgd_options)
    run = worker_fn(local)
    sharded = NamedSharding(mesh, P(axis_name))

    def init(inner_state):
        one = local.init(inner_state)
        stack = jax.jit(lambda s: jax.tree.map(lambda x: jnp.broadcast_to(x, (num_workers,) + jnp.shape(x)), s),
                        out_shardings=sharded)
        return stack(one)

    def block(states, sched, hparams, key):
        base = lax.axis_index(axis_name) * per_device
        if per_device == 1:
            one = jax.tree.map(lambda x: x[0], states)
            new, metrics = run(one, base, sched, hparams, key)
            return jax.tree.map(lambda x: x[None], (new, metrics))
        ids = base + jnp.arange(per_device, dtype=jnp.int32)
        return jax.vmap(run, in_axes=(0, 0, None, None, None), axis_name=LOCAL_AXIS)(
            states, ids, sched, hparams, key)

    mapped = jax.shard_map(block, mesh=mesh, in_specs=(P(axis_name), P(), P(), P()), out_specs=P(axis_name),
                           check_vma=per_device == 1)

    def parallel_step(states, sched, hparams, key):
        return mapped(states, sched, hparams, key)

    return TrainStep(init=init, step=parallel_step)


def worker_output(states: LocalSGDState) -> PyTree:
    """The output iterate: the mean over workers of their averaged iterates (replicated)."""
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), states.average.params)


def worker_params(states: LocalSGDState, get_params=lambda s: s.params) -> PyTree:
    """The workers' current parameters, stacked on a leading axis of size ``K``."""
    return get_params(states.inner)


def fetch(tree: PyTree) -> PyTree:
    """Brings a pytree to host numpy, gathering arrays spread over several processes (every
    process must call it)."""
    return to_host(tree)


def initialize_distributed(coordinator: str, num_processes: int, process_id: int, *,
                           cpu_collectives: str = "gloo") -> None:
    """Joins a multi-process run (``jax.distributed.initialize``); on CPU, collectives go through
    ``cpu_collectives`` (gloo). Call before any other jax call."""
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f"need 0 <= process id < number of processes, got {process_id} of {num_processes}")
    # Only affects the CPU backend: harmless where an accelerator does the collectives.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
