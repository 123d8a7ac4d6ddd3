"""Benchmarks of local SGD's drivers (:mod:`comm_sgd.parallel`).

The problem throughout is L2-regularised logistic regression (50 features and a bias, labels from a
planted model) on 4,000 examples resident on the device; each worker draws minibatches of 8 i.i.d.
from the shared pool inside jit, and plain SGD is the inner step. Local SGD averages every 8 steps
(schedule ``fixed:8``).

1. Simulated workers against one: ``comm_sgd.parallel_local_sgd`` with K = 16 workers simulated
   by ``vmap`` (``mesh=None``), driven by ``trainstep.unroll`` for 4,000 steps, against one
   worker's plain run (``unroll`` of the same ``gradient_step``) for 4,000 steps. Sixteen times
   the gradient work: at this size a step is dominated by per-operation overhead, so batching the
   workers should cost far less than 16x. Target: time ratio <= 4. Also recorded (the summary's
   ``one program``): the jitted run compiles once over two calls with different states, its
   compiled HLO holds exactly one while loop of 4,000 iterations (the other loops are the CPU
   backend's rolled threefry rounds, 5 iterations each), and the per-worker Python function is
   traced once, not called per step.
2. ``shard_map`` against ``vmap``: the same local SGD with 8 workers, on a mesh of 8 devices (one
   worker per device, ``mesh=comm_sgd.worker_mesh(8)``) against 8 simulated workers on one device.
   The ratio is printed without a target: on CPU the 8 "devices" share the host's cores and every
   averaging step is a cross-device all-reduce, so it measures the mesh's overhead, not a speed-up.
   Both runs must reach the same parameters (one worker per device: the same arithmetic).

   This needs 8 devices. When the benchmark process has fewer (``python -m benchmarks`` leaves
   JAX's defaults alone), comparison 2 runs in a child process started with
   ``--xla_force_host_platform_device_count=8``: forcing 8 host devices on a machine with fewer
   cores slows every single-device program of the process severalfold (measured ~2x on 2 cores),
   which would distort the other benchmarks and comparison 1. Where even the child has fewer than
   8 devices (an accelerator backend with fewer chips), it is skipped with a note.

What comparison 1 measures on CPU: both steps are a few microseconds of arithmetic, so the
run time is mostly XLA's per-operation dispatch inside the loop. One worker's step executes ~60
operations (its threefry hashes, on scalar keys, are compiled as single kernels: XLA:CPU's
small-while-loop pass, 1 kB by default). Under ``vmap`` the per-worker keys are arrays, the
rolled threefry loops of ``fold_in(k_w, 0)`` and of ``randint`` exceed that size, and each runs
as 5 dispatched iterations: ~410 operations per step, most of the cost of the K = 16 run. The
local-SGD wrapper itself (cond, averaging, iterate average) costs ~15-20% (K = 1 against plain).

Timings exclude compilation (every function is warmed up) and interleave the functions compared
(see :func:`benchmarks.time_interleaved`); the summary reports the ratio of the medians.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import comm_sgd
import trainstep
from benchmarks import Result, fmt_seconds, time_interleaved

N_TRAIN, N_FEATURES = 4000, 50
BATCH = 8
PERIOD = 8
NUM_WORKERS = 16
MESH_WORKERS = 8
STEPS, QUICK_STEPS = 4000, 400

WORKERS_TARGET = 4.0

CHILD_FLAG = "--mesh-child"
RESULT_MARKER = "BENCH_COMM_SGD_RESULT "


# ---------------------------------------------------------------------------------------------
# Problem: logistic regression, data on device


def make_data(seed: int = 0):
    """Features ``x`` (N, D) and labels ``y`` in {-1, +1} from a planted logistic model."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_TRAIN, N_FEATURES)).astype(np.float32)
    w = rng.normal(size=N_FEATURES).astype(np.float32) / np.sqrt(N_FEATURES)
    p = 1.0 / (1.0 + np.exp(-(x @ w + 0.1)))
    y = np.where(rng.random(N_TRAIN) < p, 1.0, -1.0).astype(np.float32)
    return jax.device_put(x), jax.device_put(y)


def logistic_loss(params, batch, hparams, key):
    del key
    x, y = batch
    margins = y * (x @ params["w"] + params["b"])
    return jnp.mean(jax.nn.softplus(-margins)) + 0.5 * hparams["l2"] * jnp.sum(params["w"] ** 2)


def make_problem():
    ts = trainstep.gradient_step(logistic_loss, lambda h: optax.sgd(h["learning_rate"]), has_aux=False)
    hparams = {"learning_rate": jnp.asarray(0.1, jnp.float32), "l2": jnp.asarray(1e-3, jnp.float32)}
    params = {"w": jnp.zeros((N_FEATURES,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
    return ts, hparams, ts.init(params, hparams)


def full_loss(params, hparams, x, y) -> float:
    return float(logistic_loss(params, (x, y), hparams, None))


def make_local_sgd_run(ts, num_workers: int, num_steps: int, mesh=None):
    """``(parallel step, jitted run(states, hparams, key, x, y) -> (states, metrics), trace counter)``.

    The counter (a one-element list) counts the Python calls of the per-worker batch function:
    one per trace, whatever the number of steps, if the whole run is one compiled loop."""
    traces = [0]
    mask = comm_sgd.fixed(PERIOD).mask(num_steps)

    def run(states, hparams, key, x, y):
        sample = trainstep.minibatch_fn((x, y), BATCH, mode="iid")

        def worker_batch_fn(k, t, worker):
            del worker  # i.i.d. workers: every one samples the shared pool
            traces[0] += 1
            return sample(k, t)

        ps = comm_sgd.parallel_local_sgd(ts, num_workers=num_workers, worker_batch_fn=worker_batch_fn, mesh=mesh)
        return trainstep.unroll(ps, states, hparams, key=key, num_steps=num_steps,
                                batch_fn=comm_sgd.schedule_batch_fn(mask))

    # The data are arguments of the jitted run, so its step is built inside; ``init`` does not
    # sample, and a step built with a placeholder batch function gives the same initial states.
    ps_init = comm_sgd.parallel_local_sgd(ts, num_workers=num_workers, worker_batch_fn=lambda k, t, w: None,
                                          mesh=mesh)
    return ps_init, jax.jit(run), traces


def make_one_worker_run(ts, num_steps: int):
    def run(state, hparams, key, x, y):
        sample = trainstep.minibatch_fn((x, y), BATCH, mode="iid")
        return trainstep.unroll(ts, state, hparams, key=key, num_steps=num_steps, batch_fn=sample)

    return jax.jit(run)


def loop_trip_counts(jitted, *args) -> list:
    """Trip counts of the while loops of the compiled program (XLA's ``known_trip_count``)."""
    text = jitted.lower(*args).compile().as_text()
    return [int(n) for n in re.findall(r'known_trip_count"?\s*[:=]\s*\{\s*"?n"?\s*[:=]\s*"?(\d+)', text)]


# ---------------------------------------------------------------------------------------------
# 1. K = 16 simulated workers vs one worker


def bench_workers(data, quick: bool) -> list:
    x, y = data
    num_steps = QUICK_STEPS if quick else STEPS
    ts, hparams, state = make_problem()
    key = jax.random.key(0)
    one = make_one_worker_run(ts, num_steps)
    ps, local, traces = make_local_sgd_run(ts, NUM_WORKERS, num_steps)
    states = ps.init(state)

    # One compiled program: two calls with different states (the second continues the first)
    # reuse one executable, the Python step is traced once, and the loop over steps is XLA's.
    states1, metrics = local(states, hparams, key, x, y)
    traced_once = traces[0]
    states2, _ = local(states1, hparams, key, x, y)
    cache_size = local._cache_size() if hasattr(local, "_cache_size") else None
    trips = loop_trip_counts(local, states, hparams, key, x, y)
    loops_over_steps = trips.count(num_steps)
    one_program = (cache_size in (1, None)) and traces[0] == traced_once and loops_over_steps == 1
    print(f"one compiled program: {one_program} (executables after 2 calls: {cache_size}; per-worker Python "
          f"function called {traces[0]} time(s) for 2 x {num_steps} steps x {NUM_WORKERS} workers; compiled "
          f"while loops' trip counts {sorted(trips, reverse=True)}: {loops_over_steps} over the {num_steps} steps)")

    final_one, _ = one(state, hparams, key, x, y)
    output = comm_sgd.worker_output(states1)
    params = comm_sgd.worker_params(states1)
    spread = max(float(jnp.max(jnp.abs(p - p[:1]))) for p in jax.tree.leaves(params))
    comms = np.asarray(states1.communications)
    print(f"after {num_steps} steps: full-data loss, one worker {full_loss(final_one.params, hparams, x, y):.4f}, "
          f"local SGD K={NUM_WORKERS} {full_loss(output, hparams, x, y):.4f} (start "
          f"{full_loss(state.params, hparams, x, y):.4f}); communications per worker {comms.min()}..{comms.max()} "
          f"(expected {num_steps // PERIOD}); workers' params after the final average differ by {spread:.1e}")
    assert np.all(comms == num_steps // PERIOD), f"fixed:{PERIOD} should average {num_steps // PERIOD} times"
    assert spread < 1e-5, "the workers should hold the same parameters after the final average"
    assert metrics["loss"].shape == (num_steps, NUM_WORKERS)
    del states2

    a, ref = f"local SGD, K={NUM_WORKERS} (vmap)", "one worker, plain unroll"
    timings = time_interleaved({a: lambda: local(states, hparams, key, x, y),
                                ref: lambda: one(state, hparams, key, x, y)},
                               rounds=3 if quick else 9)
    print(timings.table(baseline=ref))
    ratio = timings.ratio(a, ref)
    per_worker_step = timings.median(a) / (num_steps * NUM_WORKERS)
    print(f"ratio of medians, K={NUM_WORKERS} / one worker = {ratio:.3f} (target <= {WORKERS_TARGET}); "
          f"one worker {fmt_seconds(timings.median(ref) / num_steps)} per step, local SGD "
          f"{fmt_seconds(timings.median(a) / num_steps)} per step ({fmt_seconds(per_worker_step)} per worker-step)")
    return [Result(f"local SGD K={NUM_WORKERS} (vmap) / one worker, {num_steps:,} steps (time)", ratio,
                   WORKERS_TARGET, f"{fmt_seconds(timings.median(a))} vs {fmt_seconds(timings.median(ref))}; "
                                   f"one program: {one_program}")]


# ---------------------------------------------------------------------------------------------
# 2. shard_map over 8 devices vs vmap


def measure_mesh(data, quick: bool) -> dict:
    """Runs comparison 2 in this process (which must have >= ``MESH_WORKERS`` devices)."""
    x, y = data
    num_steps = QUICK_STEPS if quick else STEPS
    ts, hparams, state = make_problem()
    key = jax.random.key(1)
    mesh = comm_sgd.worker_mesh(MESH_WORKERS, devices=jax.devices()[:MESH_WORKERS])
    ps_v, on_vmap, _ = make_local_sgd_run(ts, MESH_WORKERS, num_steps)
    ps_s, on_mesh, _ = make_local_sgd_run(ts, MESH_WORKERS, num_steps, mesh=mesh)
    states_v, states_s = ps_v.init(state), ps_s.init(state)

    out_v = on_vmap(states_v, hparams, key, x, y)[0]
    out_s = on_mesh(states_s, hparams, key, x, y)[0]
    diff = max(float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
               for u, v in zip(jax.tree.leaves(comm_sgd.worker_params(out_v)),
                               jax.tree.leaves(comm_sgd.worker_params(out_s)), strict=True))
    print(f"{MESH_WORKERS} workers after {num_steps} steps: max |shard_map - vmap| over the workers' params = "
          f"{diff:.1e}")
    assert diff < 1e-5, "shard_map and vmap disagree: the timing comparison would not be fair"

    a, ref = f"shard_map, {MESH_WORKERS} devices", f"vmap, {MESH_WORKERS} workers on one device"
    timings = time_interleaved({a: lambda: on_mesh(states_s, hparams, key, x, y),
                                ref: lambda: on_vmap(states_v, hparams, key, x, y)},
                               rounds=3 if quick else 7)
    print(timings.table(baseline=ref))
    return {"ratio": timings.ratio(a, ref), "mesh": timings.median(a), "vmap": timings.median(ref),
            "steps": num_steps, "devices": jax.device_count(), "cores": os.cpu_count()}


def mesh_in_child(quick: bool):
    """Runs :func:`measure_mesh` in a child process with 8 forced host devices; its output is
    forwarded. Returns the child's result dict, or a string saying why there is none."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={MESH_WORKERS}".strip()
    cmd = [sys.executable, "-m", "benchmarks.bench_comm_sgd", CHILD_FLAG] + (["--quick"] if quick else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=False)
    found = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            found = json.loads(line[len(RESULT_MARKER):])
        else:
            print(f"  | {line}")
    if proc.returncode != 0:
        raise RuntimeError(f"the shard_map child process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return found


def bench_mesh(data, quick: bool) -> list:
    if jax.device_count() >= MESH_WORKERS:
        found = measure_mesh(data, quick)
    else:
        print(f"this process has {jax.device_count()} device(s): running in a child process with "
              f"--xla_force_host_platform_device_count={MESH_WORKERS}", flush=True)
        found = mesh_in_child(quick)
    if not isinstance(found, dict):
        print(f"skipped: {found}")
        return []
    ratio = found["ratio"]
    print(f"ratio of medians, shard_map / vmap ({MESH_WORKERS} workers, {found['steps']} steps) = {ratio:.3f} "
          f"(no target; {found['devices']} devices on {found['cores']} CPU cores)")
    return [Result(f"local SGD K={MESH_WORKERS}: shard_map on {MESH_WORKERS} devices / vmap (time, no target)", ratio,
                   math.inf, f"{fmt_seconds(found['mesh'])} vs {fmt_seconds(found['vmap'])}; "
                             f"{found['devices']} devices, {found['cores']} cores")]


def child_main(quick: bool) -> None:
    if jax.device_count() < MESH_WORKERS:
        reason = (f"needs {MESH_WORKERS} devices, the {jax.default_backend()} backend has {jax.device_count()} "
                  f"(the host-device flag only multiplies CPU devices)")
        print(RESULT_MARKER + json.dumps(reason), flush=True)
        return
    found = measure_mesh(make_data(), quick)
    print(RESULT_MARKER + json.dumps(found), flush=True)


def main(quick: bool = False) -> list:
    data = make_data()
    num_steps = QUICK_STEPS if quick else STEPS
    print(f"[1] local SGD with {NUM_WORKERS} simulated workers (vmap) vs one worker: logistic regression, "
          f"{N_FEATURES} features, batch {BATCH} per worker iid from {N_TRAIN} on-device examples, fixed:{PERIOD}, "
          f"{num_steps} steps", flush=True)
    results = bench_workers(data, quick)
    print(f"\n[2] local SGD with {MESH_WORKERS} workers: shard_map on {MESH_WORKERS} devices vs vmap on one, "
          f"{num_steps} steps", flush=True)
    results.extend(bench_mesh(data, quick))
    return results


if __name__ == "__main__":
    if CHILD_FLAG in sys.argv[1:]:
        child_main(quick="--quick" in sys.argv[1:])
    else:
        for r in main(quick="--quick" in sys.argv[1:]):
            print(r)
