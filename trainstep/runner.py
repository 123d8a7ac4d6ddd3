"""The experiment runner every command-line tool of the library uses.

It runs :func:`trainstep.unroll` in jitted chunks with a tqdm progress bar, saves an
orbax checkpoint into the output folder after every chunk, resumes from it when the same command
is run again with the same ``--out`` (the result equals that of an uninterrupted run, because the
step keys depend on the global step index only), stops at the first non-finite loss keeping the
last finite checkpoint, and writes ``results.json`` atomically.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from trainstep.core import BatchFn, StepFn, TrainStep, unroll

PyTree = Any

CHECKPOINT_DIR = "checkpoints"
RUN_CONFIG = "run_config.json"


class ConfigError(ValueError):
    """A bad command-line or experiment configuration (reported with exit code 2)."""


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss; ``step`` is the global index of the first bad step."""

    def __init__(self, step: int, what: str = "loss", checkpoint_step: Optional[int] = None):
        self.step = int(step)
        where = f"at step {self.step}" if what == "loss" else f"after step {self.step} (checked once per chunk)"
        kept = ("no checkpoint had been written" if checkpoint_step is None
                else f"the last finite checkpoint (after {checkpoint_step} steps) was kept")
        super().__init__(f"non-finite {what} {where}: training stopped; {kept}")


class RunOutput(NamedTuple):
    state: PyTree
    history: dict  # metric name -> numpy array with one entry per step
    wall_s: float  # cumulative over resumed sessions
    resumed_from: int  # number of steps restored from a checkpoint (0 for a fresh run)


# ---------------------------------------------------------------------------------------------
# Files


def to_jsonable(obj):
    """Converts numpy/jax scalars and arrays (recursively) to JSON-friendly Python objects."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, jax.Array)) or np.isscalar(obj) and isinstance(obj, np.generic):
        arr = np.asarray(obj)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    return obj


def write_json_atomic(path: str, obj) -> None:
    """Writes JSON to a temporary file in the same folder, then renames it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make results unreadable to others
        with os.fdopen(fd, "w") as f:
            json.dump(to_jsonable(obj), f, indent=2, sort_keys=False, allow_nan=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def environment_info() -> dict:
    """Package versions and the devices the run used."""
    versions = {}
    for pkg in ("jax", "jaxlib", "optax", "flax", "chex", "numpy", "orbax-checkpoint", "mnist1d", "scikit-learn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def write_results(out_dir: str, config: dict, metrics: dict, *, wall_s: float, **extra) -> dict:
    """Writes ``out_dir/results.json``: config, metrics, wall time, environment, and ``extra``."""
    results = {"config": config, "metrics": metrics, "wall_s": wall_s, **extra, "environment": environment_info()}
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    return to_jsonable(results)


def downsample_curve(values: np.ndarray, max_points: int = 200) -> dict:
    """Window means of a per-step curve, for plots and results files."""
    values = np.asarray(values, np.float64)
    n = len(values)
    if n == 0:
        return {"step": [], "value": []}
    width = max(1, int(np.ceil(n / max_points)))
    edges = np.arange(0, n, width)
    means = [float(np.mean(values[i:i + width])) for i in edges]
    steps = [int(min(i + width, n)) for i in edges]
    return {"step": steps, "value": means}


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_manager(out_dir: str):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(out_dir, CHECKPOINT_DIR)), options=options)


def _check_run_config(out_dir: str, config: dict) -> None:
    path = os.path.join(out_dir, RUN_CONFIG)
    wanted = json.loads(json.dumps(to_jsonable(config)))
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != wanted and os.path.isdir(os.path.join(out_dir, CHECKPOINT_DIR)):
            diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise ConfigError(
                f"{out_dir} holds a checkpoint of a different run (differs in {diff}); "
                "use another --out, or delete that folder to start over"
            )
    write_json_atomic(path, wanted)


def to_host(tree: PyTree) -> PyTree:
    """``jax.device_get`` that also works on arrays spread over several processes (after
    ``jax.distributed.initialize``): those are gathered with ``process_allgather`` first, so every
    process must call it."""

    def leaf(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(leaf, tree)


def _all_finite(tree) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


# ---------------------------------------------------------------------------------------------
# The chunked run


def run_chunked(
    step: TrainStep | StepFn,
    state: PyTree,
    hparams: PyTree,
    *,
    key: jax.Array,
    num_steps: int,
    batch_fn: BatchFn,
    out_dir: Optional[str],
    config: dict,
    chunk_size: Optional[int] = None,
    desc: str = "train",
    progress: bool = True,
    on_chunk: Optional[Callable[[int, PyTree], None]] = None,
) -> RunOutput:
    """Runs ``num_steps`` steps of ``step`` in checkpointed chunks.

    Args:
      step, state, hparams, key, batch_fn: as in :func:`trainstep.unroll`.
      num_steps: total number of steps of the run.
      out_dir: output folder holding ``checkpoints/`` and ``run_config.json``; ``None`` runs
        without checkpoints.
      config: the run's configuration; resuming requires the same configuration.
      chunk_size: steps per jitted chunk and checkpoint (default: about 20 chunks).
      desc, progress: tqdm label and switch.
      on_chunk: called as ``on_chunk(steps_done, state)`` after each saved chunk.

    Returns:
      A :class:`RunOutput`.

    Raises:
      NonFiniteLossError: at the first non-finite loss (or non-finite state); the checkpoint of
        the last finite chunk stays in ``out_dir``.
      ConfigError: ``out_dir`` holds a checkpoint of a run with another configuration.
    """
    from tqdm.auto import tqdm

    if num_steps < 1:
        raise ConfigError(f"the number of steps must be >= 1, got {num_steps}")
    chunk_size = int(chunk_size or max(1, -(-num_steps // 20)))
    if chunk_size < 1:
        raise ConfigError(f"chunk size must be >= 1, got {chunk_size}")

    # Shapes of the metrics, so that the history can be preallocated (and restored by shape).
    metric_shapes = jax.eval_shape(
        lambda s, h: unroll(step, s, h, key=key, num_steps=1, batch_fn=batch_fn)[1], state, hparams)
    history = {k: np.full((num_steps,) + v.shape[1:], np.nan if np.issubdtype(v.dtype, np.inexact) else 0, v.dtype)
               for k, v in metric_shapes.items()}
    if "loss" not in history:
        raise ValueError("the step's metrics must include 'loss'")
    done, wall_before = 0, 0.0

    manager = None
    if out_dir is not None:
        import orbax.checkpoint as ocp  # imported lazily: runs without out_dir never need it

        _check_run_config(out_dir, config)
        manager = _checkpoint_manager(out_dir)
        latest = manager.latest_step()
        if latest is not None:
            template = {"state": state, "history": history, "wall_s": np.zeros((), np.float64)}
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
            restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
            state = jax.tree.map(lambda ref, x: jnp.asarray(x, dtype=jnp.result_type(ref)), state,
                                 restored["state"])
            history = {k: np.asarray(v) for k, v in restored["history"].items()}
            done, wall_before = int(latest), float(restored["wall_s"])

    resumed_from = done
    saved = done if done > 0 else None

    # Only two chunk lengths ever compile: chunk_size and the remainder.
    @functools.partial(jax.jit, static_argnums=3)
    def run_chunk(s, h, offset, n):
        return unroll(step, s, h, key=key, num_steps=n, batch_fn=batch_fn, step_offset=offset)

    start = time.perf_counter()
    bar = tqdm(total=num_steps, initial=done, desc=desc, disable=not progress, leave=False,
               dynamic_ncols=True, file=sys.stderr)
    try:
        while done < num_steps:
            n = min(chunk_size, num_steps - done)
            new_state, metrics = run_chunk(state, hparams, jnp.asarray(done, jnp.int32), n)
            metrics = to_host(metrics)
            loss = np.asarray(metrics["loss"])
            bad = ~np.isfinite(loss)
            if bad.any():
                raise NonFiniteLossError(done + int(np.argmax(bad)), checkpoint_step=saved)
            if not _all_finite(new_state):
                raise NonFiniteLossError(done + n - 1, what="training state", checkpoint_step=saved)
            for k, v in metrics.items():
                history[k][done:done + n] = v
            state, done = new_state, done + n
            wall = wall_before + time.perf_counter() - start
            if manager is not None:
                tree = {"state": state, "history": history, "wall_s": np.asarray(wall, np.float64)}
                manager.save(done, args=ocp.args.StandardSave(tree))
                manager.wait_until_finished()
                saved = done
            bar.update(n)
            bar.set_postfix(loss=f"{float(np.mean(loss)):.4g}")
            if on_chunk is not None:
                on_chunk(done, state)
    finally:
        bar.close()
        if manager is not None:
            manager.close()
    return RunOutput(state, history, wall_before + time.perf_counter() - start, resumed_from)
