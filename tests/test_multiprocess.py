"""Real multi-process runs: two processes on loopback with 4 CPU devices each, joined by
``jax.distributed`` with gloo collectives, against the one-process simulation of the same workers.

Each process is a fresh interpreter (``jax.distributed.initialize`` must come before any other jax
call, so it cannot run inside the pytest process). Run as a script, this file is one process of
the library-level test: ``python tests/test_multiprocess.py PROCESS_ID PORT OUT_NPZ``.

Across processes the average goes through gloo's all-reduce, which sums in another order than the
one-device ``vmap`` (or one process's 8 devices): the results agree to float32 rounding, not bit for
bit, so these tests compare with tolerances.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
LOCAL_DEVICES = 4
TIMEOUT_S = 120
LIBRARY_WORKERS = 16  # two per device


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # Replaces the 8 devices tests/conftest.py put into this process's XLA_FLAGS.
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}")


def _run_processes(commands: list[list[str]], cwd: Path) -> list[tuple[int, str, str]]:
    """Starts one process per command and waits for all; on a failure or after ``TIMEOUT_S`` kills
    the rest (they would wait forever at the next collective). Returns ``(returncode, stdout,
    stderr)`` per process (output goes through files: no pipe can fill up and block a process)."""
    logs = [(cwd / f"proc{i}.out", cwd / f"proc{i}.err") for i in range(len(commands))]
    procs = []
    for c, (out, err) in zip(commands, logs, strict=True):
        with open(out, "w") as fo, open(err, "w") as fe:
            procs.append(subprocess.Popen(c, cwd=cwd, env=_env(), stdout=fo, stderr=fe))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return [(p.returncode, out.read_text(), err.read_text()) for p, (out, err) in zip(procs, logs, strict=True)]


def _report(results) -> str:
    return "\n".join(f"--- process {i}: exit code {rc}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-6000:]}"
                     for i, (rc, out, err) in enumerate(results))


def _assert_all_ok(results):
    assert all(rc == 0 for rc, _, _ in results), _report(results)


# ---------------------------------------------------------------------------------------------
# python -m comm_sgd logreg in two processes


LOGREG_ARGS = ["logreg", "--synthetic", "256,5,2", "--l2", "0.02", "--workers", "8", "--steps", "120",
               "--batch", "2", "--seeds", "2", "--schedule", "fixed:4", "--checkpoint-every", "40", "--no-progress"]


def test_cli_two_processes_equal_one_process_simulation(tmp_path, capsys):
    from comm_sgd import cli
    from trainstep.cli import run_main

    out = tmp_path / "multi"
    port = _free_port()
    commands = [[sys.executable, "-m", "comm_sgd", *LOGREG_ARGS, "--backend", "mesh", "--out", str(out),
                 "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(NUM_PROCESSES), "--process-id", str(i)]
                for i in range(NUM_PROCESSES)]
    results = _run_processes(commands, tmp_path)
    _assert_all_ok(results)
    # Only process 0 reports and writes (both share --out).
    assert "suboptimality" in results[0][1] and "results.json" in results[0][1], _report(results)
    assert "suboptimality" not in results[1][1] and "results.json" not in results[1][1], _report(results)
    assert sorted(os.listdir(out)) == ["checkpoints", "params.npz", "results.json", "run_config.json"]
    # Every chunk was checkpointed by both processes together (orbax, global arrays); one is kept.
    assert sorted(os.listdir(out / "checkpoints")) == ["120"]

    # The reference: the same workers simulated with vmap, in this process.
    ref = tmp_path / "simulated"
    assert run_main(cli.main, [*LOGREG_ARGS, "--backend", "vmap", "--out", str(ref)]) == 0, capsys.readouterr().err

    multi = json.loads((out / "results.json").read_text())
    single = json.loads((ref / "results.json").read_text())
    assert multi["num_processes"] == NUM_PROCESSES and multi["num_devices"] == NUM_PROCESSES * LOCAL_DEVICES
    assert multi["config"]["backend"] == "mesh" and multi["config"]["num_processes"] == NUM_PROCESSES
    assert multi["communications"] == single["communications"] == 30
    assert multi["f_star"] == single["f_star"]
    with np.load(out / "params.npz") as f:
        w_multi = f["w"]
    with np.load(ref / "params.npz") as f:
        w_single = f["w"]
    assert w_multi.shape == w_single.shape == (2, 5)
    np.testing.assert_allclose(w_multi, w_single, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(multi["suboptimality_per_seed"], single["suboptimality_per_seed"], rtol=1e-3)
    print(f"multi-process vs simulation: bitwise={np.array_equal(w_multi, w_single)}, "
          f"max |diff| = {np.max(np.abs(w_multi - w_single)):.3g}")

    # The same command again resumes from the multi-process checkpoint (restored by both
    # processes) and reports the same numbers.
    first = (out / "params.npz").read_bytes()
    port = _free_port()
    for c in commands:
        c[c.index("--coordinator") + 1] = f"127.0.0.1:{port}"
    results = _run_processes(commands, tmp_path)
    _assert_all_ok(results)
    assert (out / "params.npz").read_bytes() == first
    assert json.loads((out / "results.json").read_text())["metrics"] == multi["metrics"]


# ---------------------------------------------------------------------------------------------
# The library: parallel_local_sgd on a global mesh


def _library_process(process_id: int, port: int, out_path: str) -> None:
    """One process of :func:`test_library_two_processes_equal_simulation`: runs local SGD with
    ``K = 16`` workers, two per device (the average then goes within each device, then across
    devices and processes), on the global mesh and simulated with vmap on this process's first
    device, and saves both final states (gathered) to ``out_path``. (One worker per device is
    the CLI test's case.)"""
    from comm_sgd import initialize_distributed

    initialize_distributed(f"127.0.0.1:{port}", NUM_PROCESSES, process_id)

    import jax
    import jax.numpy as jnp
    import optax

    from comm_sgd import fetch, fixed, parallel_local_sgd, schedule_batch_fn, worker_mesh
    from trainstep import gradient_step, unroll

    assert jax.process_count() == NUM_PROCESSES and jax.process_index() == process_id
    assert jax.local_device_count() == LOCAL_DEVICES and jax.device_count() == NUM_PROCESSES * LOCAL_DEVICES
    n, d, T = 64, 5, 40
    rng = np.random.default_rng(0)  # the same data in every process
    X = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    Y = jnp.asarray(rng.normal(size=n), jnp.float32)

    def loss(w, batch, hparams, key):
        x, y = batch
        return jnp.mean((x @ w - y) ** 2)

    def worker_batch_fn(key, t, worker):
        idx = jax.random.randint(key, (4,), 0, n)
        return X[idx], Y[idx]

    inner = gradient_step(loss, optax.sgd(0.05), has_aux=False)
    batch_fn = schedule_batch_fn(fixed(4).mask(T))
    saved = {}
    for backend, mesh in (("vmap", None), ("mesh", worker_mesh(LIBRARY_WORKERS))):
        ps = parallel_local_sgd(inner, num_workers=LIBRARY_WORKERS, worker_batch_fn=worker_batch_fn, mesh=mesh,
                                average="uniform")
        state = ps.init(inner.init(jnp.zeros(d)))
        if mesh is not None:  # really spread over both processes
            assert not state.inner.params.is_fully_addressable
        state, metrics = jax.jit(
            lambda s: unroll(ps, s, None, key=jax.random.key(1), num_steps=T, batch_fn=batch_fn))(state)
        state, metrics = fetch((state, metrics))
        saved[f"{backend}_params"] = state.inner.params
        saved[f"{backend}_average"] = state.average.params
        saved[f"{backend}_communications"] = state.communications
        saved[f"{backend}_loss"] = metrics["loss"]
    np.savez(out_path, **saved)


def test_library_two_processes_equal_simulation(tmp_path):
    port = _free_port()
    commands = [[sys.executable, str(Path(__file__).resolve()), str(i), str(port), str(tmp_path / f"p{i}.npz")]
                for i in range(NUM_PROCESSES)]
    results = _run_processes(commands, tmp_path)
    _assert_all_ok(results)
    r0, r1 = (dict(np.load(tmp_path / f"p{i}.npz")) for i in range(NUM_PROCESSES))
    # Both processes gathered the same global result.
    assert r0.keys() == r1.keys()
    for k in r0:
        np.testing.assert_array_equal(r0[k], r1[k], err_msg=k)
    K = LIBRARY_WORKERS
    np.testing.assert_array_equal(r0["mesh_communications"], np.full(K, 10))
    np.testing.assert_array_equal(r0["vmap_communications"], np.full(K, 10))
    assert r0["mesh_params"].shape == (K, 5) and r0["mesh_loss"].shape == (40, K)
    # The workers are interchangeable after the last average: all rows equal.
    np.testing.assert_array_equal(r0["mesh_params"], np.broadcast_to(r0["mesh_params"][:1], (K, 5)))
    for what in ("params", "average", "loss"):
        np.testing.assert_allclose(r0[f"mesh_{what}"], r0[f"vmap_{what}"], rtol=1e-5, atol=1e-7, err_msg=what)

if __name__ == "__main__":
    _library_process(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
