"""Tests of ``python -m comm_sgd logreg``: reported numbers against an independent float64
computation, bad-input exit codes, vmap/mesh agreement, resume.

The CLI runs in-process through :func:`trainstep.cli.run_main` (argparse errors surface as
``SystemExit``, as they do for the real program); one test runs the real ``python -m comm_sgd``.
The reference optimum comes from a Newton solver written here, not from the library's.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import scipy.optimize

from comm_sgd import cli
from trainstep.cli import run_main

REPO_ROOT = Path(__file__).resolve().parents[1]
VALID_SCHEDULES = ("every", "fixed:H", "post-local:W:H", "increasing:c[:p]", "once", "steps:s1,s2,...")
TOP_LEVEL_KEYS = {"communications", "bytes_all_reduced", "suboptimality", "final_loss", "f_star",
                  "suboptimality_per_seed", "final_loss_per_seed", "shift_a", "condition_number",
                  "num_devices", "num_processes", "config", "metrics", "wall_s", "environment"}


def run_cli(argv):
    """Exit code of the CLI run in-process (argparse exits with SystemExit, like the real program)."""
    try:
        return run_main(cli.main, [str(a) for a in argv])
    except SystemExit as e:
        return e.code


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# An independent float64 reference: the objective and a damped Newton solver


def objective(w, X, y, l2):
    """``mean log(1 + exp(-y x.w)) + l2/2 |w|^2`` in float64."""
    w = np.asarray(w, np.float64)
    return float(np.mean(np.logaddexp(0.0, -y * (X @ w))) + 0.5 * l2 * (w @ w))


def newton_optimum(X, y, l2):
    """Minimiser and minimum by Newton's method with backtracking, to a gradient norm of 1e-13."""
    n, d = X.shape
    w = np.zeros(d)
    for _ in range(200):
        p = 0.5 * (1.0 - np.tanh(0.5 * y * (X @ w)))  # sigmoid(-margin), stable
        grad = -(X.T @ (y * p)) / n + l2 * w
        if np.linalg.norm(grad) < 1e-13:
            break
        hess = (X.T * (p * (1.0 - p))) @ X / n + l2 * np.eye(d)
        direction = np.linalg.solve(hess, grad)
        f0, step = objective(w, X, y, l2), 1.0
        while objective(w - step * direction, X, y, l2) > f0 - 0.25 * step * (grad @ direction) and step > 1e-8:
            step /= 2
        w = w - step * direction
    else:
        raise AssertionError("Newton did not converge")
    return w, objective(w, X, y, l2)


def _problem(n=300, d=5, seed=0):
    """Features stored as float32 (what the CLI computes with), labels in {-1, +1}, not separable."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    margin = X.astype(np.float64) @ rng.normal(size=d) + rng.normal(scale=1.0, size=n)
    y = np.where(margin > 0, 1, -1).astype(np.int64)
    return X, y


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def problem_npz(tmp_path_factory):
    X, y = _problem()
    return _write_npz(tmp_path_factory.mktemp("data") / "logreg.npz", X=X, y=y), X, y


def _results(out):
    return json.loads((Path(out) / "results.json").read_text())


def _params(out):
    with np.load(Path(out) / "params.npz") as f:
        return f["w"]


# ---------------------------------------------------------------------------------------------
# The reported numbers


def test_suboptimality_matches_independent_float64_computation(problem_npz, tmp_path, capsys):
    path, X, y = problem_npz
    l2, steps, seeds, H = 0.05, 300, 3, 7
    out = tmp_path / "run"
    rc = run_cli(["logreg", "--data", path, "--l2", l2, "--workers", 4, "--steps", steps, "--batch", 2,
                  "--schedule", f"fixed:{H}", "--seeds", seeds, "--out", out, "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err

    X64, y64 = X.astype(np.float64), y.astype(np.float64)
    w_star, f_star = newton_optimum(X64, y64, l2)
    # Cross-check the reference solver with scipy's (looser) quasi-Newton optimum.
    sp = scipy.optimize.minimize(objective, np.zeros(X.shape[1]), args=(X64, y64, l2), method="BFGS",
                                 options={"gtol": 1e-10})
    assert f_star <= sp.fun + 1e-12 and sp.fun - f_star < 1e-9

    r = _results(out)
    w = _params(out)
    assert w.shape == (seeds, X.shape[1]) and w.dtype == np.float64
    f_w = np.array([objective(wi, X64, y64, l2) for wi in w])
    assert r["f_star"] == pytest.approx(f_star, rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(r["final_loss_per_seed"], f_w, rtol=1e-6)
    assert r["final_loss"] == pytest.approx(np.mean(f_w), rel=1e-6)
    sub = f_w - f_star
    np.testing.assert_allclose(r["suboptimality_per_seed"], sub, rtol=1e-6, atol=1e-9)
    assert r["suboptimality"] == pytest.approx(np.mean(sub), rel=1e-6, abs=1e-9)
    # Local SGD on a strongly convex problem got somewhere, but not to the optimum exactly.
    assert np.all(sub > 0) and np.all(sub < 0.05 * (objective(np.zeros(X.shape[1]), X64, y64, l2) - f_star))
    # Strong convexity (modulus l2): f(w) - f* >= l2/2 |w - w*|^2.
    assert np.all(sub >= 0.5 * l2 * np.sum((w - w_star) ** 2, axis=1) - 1e-12)
    # Seeds are independent runs.
    assert len(set(map(tuple, w))) == seeds

    # fixed:H averages after every H-th step, and always after the last one.
    assert r["communications"] == math.ceil(steps / H) == 43
    assert r["bytes_all_reduced"] == 43 * X.shape[1] * 4  # one float32 vector per round
    assert r["metrics"]["communications"] == r["communications"]
    assert r["config"]["schedule"] == f"fixed:{H}" and r["config"]["seeds"] == seeds
    assert r["num_processes"] == 1 and r["num_devices"] == jax.device_count()
    assert f"suboptimality {r['suboptimality']:.4e} with 43 communications" in captured.out


# ---------------------------------------------------------------------------------------------
# A synthetic problem on both backends; resume


def _increasing_count(c, steps):
    """Communications of ``increasing:c``: periods ceil(c k), k = 1, 2, ..., then the last step."""
    done, k, count = 0, 1, 0
    while done + math.ceil(c * k) <= steps:
        done += math.ceil(c * k)
        count += 1
        k += 1
    return count + (done != steps)


BACKEND_ARGS = ["logreg", "--synthetic", "200,5,2", "--workers", 8, "--steps", 60, "--seeds", 2,
                "--schedule", "increasing:2", "--checkpoint-every", 30, "--no-progress"]


@pytest.fixture(scope="module")
def backend_runs(tmp_path_factory):
    """``{(backend, average): out_dir}``: the same synthetic run on both backends, for two averages."""
    root = tmp_path_factory.mktemp("backends")
    runs = {}
    for average in ("uniform", "stich"):
        for backend in ("vmap", "mesh"):
            out = root / f"{backend}-{average}"
            assert run_cli([*BACKEND_ARGS, "--average", average, "--backend", backend, "--out", out]) == 0
            runs[backend, average] = out
    return runs


def test_synthetic_problem_and_documented_top_level_keys(backend_runs):
    out = backend_runs["vmap", "stich"]
    r = _results(out)
    assert set(r) == TOP_LEVEL_KEYS
    assert set(r["metrics"]) == {"communications", "bytes_all_reduced", "suboptimality", "final_loss", "f_star",
                                 "suboptimality_per_seed", "final_loss_per_seed"}
    for k, v in r["metrics"].items():
        assert r[k] == v
    assert r["config"]["data"] == "synthetic(200,5,2)" and r["config"]["workers"] == 8
    assert r["communications"] == _increasing_count(2, 60) == 8
    assert len(r["suboptimality_per_seed"]) == 2 and all(s > 0 for s in r["suboptimality_per_seed"])
    assert _params(out).shape == (2, 5)
    assert sorted(os.listdir(out)) == ["checkpoints", "params.npz", "results.json", "run_config.json"]
    assert sorted(os.listdir(out / "checkpoints")) == ["60"]


@pytest.mark.parametrize("average", ["uniform", "stich"])
def test_mesh_backend_equals_vmap_backend(average, backend_runs):
    """8 workers on the 8 devices of tests/conftest.py against the one-device simulation."""
    a, b = _params(backend_runs["vmap", average]), _params(backend_runs["mesh", average])
    ra, rb = _results(backend_runs["vmap", average]), _results(backend_runs["mesh", average])
    assert ra["communications"] == rb["communications"] == 8
    assert (ra["config"]["backend"], rb["config"]["backend"]) == ("vmap", "mesh")
    # One worker per device runs the same per-worker program, but here the seeds are vmapped on top
    # and the batch is a single row: XLA:CPU then emits different reduction kernels for the stacked
    # (seeds x 8 workers) and per-device (seeds x 1) shapes of the d = 5 dot products, which round
    # differently in the last bit. Bit-for-bit equality is tested at the library level
    # (tests/test_comm_sgd.py::test_vmap_equals_shard_map_bit_for_bit_with_one_worker_per_device);
    # here the two backends must agree to float32 rounding over 60 steps.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert ra["metrics"].keys() == rb["metrics"].keys()
    for name in ra["metrics"]:
        np.testing.assert_allclose(ra["metrics"][name], rb["metrics"][name], rtol=1e-5, atol=1e-7)


def test_interrupted_run_resumes_from_its_checkpoint(backend_runs, tmp_path, capsys, monkeypatch):
    import comm_sgd.logreg

    args = [*BACKEND_ARGS, "--average", "stich", "--backend", "vmap"]
    whole = backend_runs["vmap", "stich"]
    real = comm_sgd.logreg.run_chunked
    seen = {}

    def interrupted_after_30(*a, **kw):
        def on_chunk(done, state):
            if done == 30:
                raise KeyboardInterrupt
        return real(*a, on_chunk=on_chunk, **kw)

    def recording(*a, **kw):
        run = real(*a, **kw)
        seen["resumed_from"] = run.resumed_from
        return run

    out = tmp_path / "resumed"
    monkeypatch.setattr(comm_sgd.logreg, "run_chunked", interrupted_after_30)
    assert run_cli([*args, "--out", out]) == 130
    assert "--out to resume" in capsys.readouterr().err
    assert not (out / "results.json").exists() and not (out / "params.npz").exists()
    assert sorted(os.listdir(out / "checkpoints")) == ["30"]

    monkeypatch.setattr(comm_sgd.logreg, "run_chunked", recording)
    assert run_cli([*args, "--out", out]) == 0, capsys.readouterr().err
    assert seen["resumed_from"] == 30
    np.testing.assert_array_equal(_params(out), _params(whole))
    assert _results(out)["metrics"] == _results(whole)["metrics"]

    # Running the finished command once more does no work and reports the same numbers.
    assert run_cli([*args, "--out", out]) == 0
    assert seen["resumed_from"] == 60
    np.testing.assert_array_equal(_params(out), _params(whole))

    # Another configuration into the same folder is refused (exit 2), leaving the results alone.
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert run_cli([*args, "--schedule", "fixed:5", "--out", out]) == 2
    assert "different run" in _error_line(capsys.readouterr().err)
    assert (out / "results.json").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Bad input: exit code 2, one error line, nothing written


@pytest.mark.parametrize("args,mentions", [
    (["--schedule", "weekly"], ["cannot read schedule 'weekly'", "valid schedules:", *VALID_SCHEDULES]),
    (["--schedule", "fixed:x"], ["'fixed:x'", "valid schedules:", *VALID_SCHEDULES]),
    (["--schedule", "fixed:0"], ["H must be >= 1", "valid schedules:", *VALID_SCHEDULES]),
    (["--lr", "adam"], ["cannot read step size 'adam'", "stich"]),
    (["--lr", "poly:1"], ["cannot read step size 'poly:1'"]),
    (["--lr", "const:-1"], ["constant step size", "> 0"]),
    (["--backend", "mesh", "--workers", 12], ["12 workers", "8 devices"]),
    (["--num-processes", 2], ["--coordinator"]),
])
def test_bad_configuration_exits_2_with_one_error_line(args, mentions, tmp_path, capsys):
    assert jax.device_count() == 8  # tests/conftest.py
    out = tmp_path / "out"
    rc = run_cli(["logreg", "--synthetic", "64,3,1", "--steps", 10, "--out", out, "--no-progress", *args])
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    line = _error_line(captured.err)
    for m in mentions:
        assert m in line, line
    assert captured.out == ""
    assert not out.exists()


def _bad_files():
    X, y = _problem(n=40, d=3)
    nan_X = X.copy()
    nan_X[7, 1] = np.nan
    return {
        "nan_x": (dict(X=nan_X, y=y), ["'X'", "non-finite"]),
        "labels_01": (dict(X=X, y=(y > 0).astype(np.int64)), ["'y'", "-1 or +1", "index"]),
        "missing_y": (dict(X=X), ["missing key(s) ['y']"]),
        "y_too_short": (dict(X=X, y=y[:-1]), ["'y'", "(40,)", "(39,)"]),
        "x_one_dimensional": (dict(X=X[:, 0], y=y), ["'X'", "2-D"]),
    }


@pytest.mark.parametrize("name", sorted(_bad_files()))
def test_bad_data_file_exits_2_naming_file_and_key(name, tmp_path, capsys):
    arrays, mentions = _bad_files()[name]
    path = _write_npz(tmp_path / f"{name}.npz", **arrays)
    out = tmp_path / "out"
    rc = run_cli(["logreg", "--data", path, "--steps", 10, "--out", out, "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    line = _error_line(captured.err)
    assert line.startswith(f"error: {path}: "), line
    for m in mentions:
        assert m in line, line
    assert not out.exists()


def test_missing_data_file_exits_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(["logreg", "--data", tmp_path / "nope.npz", "--out", out, "--no-progress"]) == 2
    assert "nope.npz" in _error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("args,mentions", [
    ([], "one of the arguments --data --synthetic is required"),
    (["--synthetic", "64,3,1", "--data", "x.npz"], "not allowed with"),
    (["--synthetic", "64,3,1", "--l2", "0"], "--l2"),
    (["--synthetic", "64,3,1", "--l2", "-1"], "--l2"),
    (["--synthetic", "64,3,1", "--l2", "nan"], "--l2"),
    (["--synthetic", "64,3"], "--synthetic must be n,d,scale"),
    (["--synthetic", "64,3,-1"], "scale > 0"),
    (["--synthetic", "64,3,1", "--workers", "0"], "--workers"),
    (["--synthetic", "64,3,1", "--backend", "tpu"], "--backend"),
])
def test_bad_arguments_exit_2_via_argparse(args, mentions, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli(["logreg", "--out", out, "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert "error:" in err and mentions in err, err
    assert not out.exists()


def test_real_subprocess_exit_codes(tmp_path):
    """The real program: workers that do not divide 8 devices exit 2 with one line and no output."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "comm_sgd", "logreg", "--synthetic", "64,3,1", "--steps", "10", "--workers", "12",
         "--backend", "mesh", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = _error_line(proc.stderr)
    assert "12 workers" in line and "8 devices" in line
    assert proc.stdout == ""
    assert not out.exists()
