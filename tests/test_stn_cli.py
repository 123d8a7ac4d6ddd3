"""Tests of ``python -m stn_jax ridge``: the tuned weight decay against an independent closed form,
bad-input exit codes.

The CLI runs in-process through :func:`trainstep.cli.run_main` (argparse errors surface as
``SystemExit``, as they do for the real program). The reference is computed here with
``numpy.linalg.lstsq`` on the augmented least-squares system, not with the library's ridge helpers.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from stn_jax import cli
from trainstep.cli import run_main
from trainstep.data import make_ridge_problem

REGRET_TARGET = 0.01
LOG10_TARGET = 0.3

# Short runs (the defaults are 3,000 cycles and 300 outer steps); on the default synthetic problem
# these reach regrets of about 1e-6 (STN) and 1e-4 (unrolled).
FAST = {
    "stn": ["--cycles", "600", "--checkpoint-every", "600"],
    "delta-stn": ["--cycles", "600", "--checkpoint-every", "600"],
    "unrolled": ["--cycles", "100", "--hyper-lr", "0.1", "--checkpoint-every", "100"],
}


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
# An independent reference


def val_loss(X, y, Xv, yv, lam):
    """Validation loss of argmin mean((Xw - y)^2) + lam |w|^2, by least squares on [X; sqrt(n lam) I]."""
    n, d = X.shape
    A = np.vstack([X, math.sqrt(n * lam) * np.eye(d)])
    b = np.concatenate([y, np.zeros(d)])
    w = np.linalg.lstsq(A, b, rcond=None)[0]
    return float(np.mean((Xv @ w - yv) ** 2))


def optimum(X, y, Xv, yv):
    grid = np.linspace(-6, 3, 91)
    i = int(np.argmin([val_loss(X, y, Xv, yv, 10.0 ** g) for g in grid]))
    res = minimize_scalar(lambda g: val_loss(X, y, Xv, yv, 10.0 ** g), bounds=(grid[i - 1], grid[i + 1]),
                          method="bounded", options={"xatol": 1e-9})
    return 10.0 ** res.x, res.fun


def _check_results(path, problem):
    with open(path) as f:
        r = json.load(f)
    X, y, Xv, yv = (np.asarray(a, np.float64) for a in problem)
    lam_star, val_star = optimum(X, y, Xv, yv)
    np.testing.assert_allclose(r["weight_decay_closed_form"], lam_star, rtol=1e-3)
    np.testing.assert_allclose(r["val_loss_closed_form"], val_star, rtol=1e-8)
    lam = r["weight_decay"]
    np.testing.assert_allclose(r["val_loss"], val_loss(X, y, Xv, yv, lam), rtol=1e-8)
    regret = (r["val_loss"] - val_star) / val_star
    np.testing.assert_allclose(r["regret"], regret, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(r["log10_ratio"], math.log10(lam / lam_star), atol=1e-6)
    assert r["regret"] <= REGRET_TARGET and abs(r["log10_ratio"]) <= LOG10_TARGET, r
    # The method's own weights are close to the exact solution at its lam.
    assert abs(r["val_loss_model"] - r["val_loss"]) <= 0.01 * val_star
    sched = r["schedule"]
    assert sched["cycle"][-1] == r["config"]["cycles"] and np.all(np.diff(sched["cycle"]) > 0)
    np.testing.assert_allclose(sched["weight_decay"][-1], lam, rtol=1e-6)
    assert sched["weight_decay"][0] < 0.1 * lam_star  # it started far away (at 0.01) and moved
    return r


@pytest.mark.parametrize("method", ["stn", "delta-stn", "unrolled"])
def test_ridge_synthetic_reaches_the_closed_form_optimum(tmp_path, method):
    out = tmp_path / "run"
    code = run_cli(["ridge", "--synthetic", "--seed", "1", "--method", method, "--out", out, "--no-progress",
                    *FAST[method]])
    assert code == 0
    r = _check_results(out / "results.json", make_ridge_problem(seed=1))
    assert r["config"]["method"] == method and r["config"]["data"] == "synthetic:seed=1"


def test_ridge_npz(tmp_path):
    p = make_ridge_problem(n_train=40, n_val=100, d=12, noise=1.5, seed=7)
    path = tmp_path / "ridge.npz"
    np.savez(path, X_train=p.X_train.astype(np.float32), y_train=p.y_train.astype(np.float32),
             X_val=p.X_val.astype(np.float32), y_val=p.y_val.astype(np.float32))
    code = run_cli(["ridge", "--data", path, "--method", "unrolled", "--out", tmp_path / "run", "--no-progress",
                    *FAST["unrolled"]])
    assert code == 0
    stored = tuple(a.astype(np.float32) for a in p)
    r = _check_results(tmp_path / "run" / "results.json", stored)
    assert r["problem"] == {"n_train": 40, "n_val": 100, "d": 12}


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one error line, nothing written


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def _good(n=20, m=10, d=4):
    rng = np.random.default_rng(0)
    return dict(X_train=rng.normal(size=(n, d)), y_train=rng.normal(size=n), X_val=rng.normal(size=(m, d)),
                y_val=rng.normal(size=m))


def _bad_files():
    def edit(**changes):
        arrays = {**_good(), **changes}
        return {k: v for k, v in arrays.items() if v is not None}

    nan_x = _good()["X_train"].copy()
    nan_x[3, 1] = np.nan
    inf_y = _good()["y_val"].copy()
    inf_y[2] = np.inf
    return {
        "missing key": (edit(y_val=None), "y_val"),
        "NaN in features": (edit(X_train=nan_x), "X_train"),
        "inf in targets": (edit(y_val=inf_y), "y_val"),
        "mismatched lengths": (edit(y_train=np.zeros(19)), "y_train"),
        "d mismatch": (edit(X_val=np.zeros((10, 5))), "X_val"),
        "1-D features": (edit(X_train=np.zeros(20)), "X_train"),
        "2-D targets": (edit(y_val=np.zeros((10, 1))), "y_val"),
        "string targets": (edit(y_train=np.array(["a"] * 20)), "y_train"),
    }


@pytest.mark.parametrize("case", list(_bad_files()))
def test_bad_npz_exits_2_and_writes_nothing(tmp_path, capsys, case):
    arrays, key = _bad_files()[case]
    path = _write(tmp_path / "bad.npz", **arrays)
    out = tmp_path / "run"
    assert run_cli(["ridge", "--data", path, "--out", out, "--no-progress"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "bad.npz" in line and f"'{key}'" in line, line
    assert not out.exists()


def test_missing_or_unreadable_file_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["ridge", "--data", tmp_path / "nope.npz", "--out", out]) == 2
    assert "no such file" in _error_line(capsys.readouterr().err)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    assert run_cli(["ridge", "--data", junk, "--out", out]) == 2
    assert "junk.npz" in _error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("args", [
    ["--synthetic", "--cycles", "0"],
    ["--synthetic", "--lr", "-1"],
    ["--synthetic", "--hyper-lr", "nan"],
    ["--synthetic", "--warmup", "-3"],
    ["--synthetic", "--method", "grid"],
    ["--synthetic", "--inner-steps", "x"],
    ["--synthetic", "--data", "f.npz"],
    [],
])
def test_bad_arguments_exit_2(tmp_path, capsys, args):
    out = tmp_path / "run"
    assert run_cli(["ridge", *args, "--out", out]) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists()


def test_unknown_subcommand_and_out_is_a_file(tmp_path, capsys):
    assert run_cli(["lasso", "--synthetic", "--out", tmp_path / "run"]) == 2
    capsys.readouterr()
    f = tmp_path / "file"
    f.write_text("x")
    assert run_cli(["ridge", "--synthetic", "--out", f]) == 2
    assert "not a folder" in _error_line(capsys.readouterr().err)
    assert f.read_text() == "x" and os.listdir(tmp_path) == ["file"]
