"""Tests of ``python -m meta_rules``: bad input exits with code 2 and one ``error:`` line, writing nothing; a
tiny ``meta-train`` then ``evaluate`` writes θ and the contracted ``results.json`` keys.

The CLI runs in-process through :func:`trainstep.cli.run_main` (argparse errors surface as ``SystemExit``,
as they do for the real program).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

import meta_rules as mr
from meta_rules import cli
from trainstep.cli import run_main

TINY_META_TRAIN = ["--steps", "2", "--tasks", "2", "--width", "8", "--depth", "1", "--hidden", "4", "--channels", "2",
                   "--batch", "8", "--trunc-min", "2", "--trunc-max", "2", "--len-min", "4", "--len-max", "4",
                   "--num-classes", "2", "--shots", "2", "--checkpoint-every", "2", "--no-progress"]
TINY_EVALUATE = ["--width", "8", "--depth", "1", "--shots", "2", "--steps", "2", "--seeds", "2", "--episodes", "2",
                 "--queries", "3", "--batch", "8"]


@pytest.fixture(scope="module", autouse=True)
def _fast_prng():
    # XLA's CPU compiler takes ~3x longer on the partitionable threefry; no test depends on the random bits.
    with jax.threefry_partitionable(False):
        yield


def run_cli(argv):
    """Exit code of the CLI run in-process (argparse exits with SystemExit, like the real program)."""
    try:
        return run_main(cli.main, [str(a) for a in argv])
    except SystemExit as e:
        return e.code


def _error_line(err: str, *, argparse: bool = False) -> str:
    """The one error line: the whole of stderr, or for argparse's own checks the line after its usage text."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    if argparse:
        errors = [line for line in lines if ": error: " in line]
        assert len(errors) == 1 and lines[0].startswith("usage:"), err
        return errors[0]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def rule_dir(tmp_path_factory):
    """A folder holding a θ file as ``meta-train`` writes it (made directly, without meta-training)."""
    folder = tmp_path_factory.mktemp("rule")
    config = mr.RuleConfig(hidden=4, channels=2)
    theta = jax.jit(lambda k: mr.init_theta(k, config))(jax.random.key(0))
    mr.save_theta(str(folder / cli.THETA_FILE), theta, config, metadata={"batch_size": 8})
    return str(folder)


def _dataset(n_per_class=12, d=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = rng.normal(size=(len(y), d)) + 2.0 * np.eye(classes, d)[y]
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    x, y = _dataset()
    path = str(tmp_path_factory.mktemp("data") / "data.npz")
    np.savez(path, X=x, y=y)
    return path


def _write(tmp_path, name, **arrays):
    path = str(tmp_path / name)
    np.savez(path, **arrays)
    return path


def test_evaluate_bad_input_exits_2(tmp_path, capsys, rule_dir, data_file):
    x, y = _dataset()
    out = tmp_path / "out"
    nan_x = x.copy()
    nan_x[3, 2] = np.nan
    cases = {
        "NaN data": (["--data", _write(tmp_path, "nan.npz", X=nan_x, y=y)], "NaN|finite"),
        "non-integer labels": (["--data", _write(tmp_path, "float.npz", X=x, y=y + 0.5)], "integer"),
        "missing key": (["--data", _write(tmp_path, "nokey.npz", X=x)], "'y'"),
        "labels do not match X": (["--data", _write(tmp_path, "short.npz", X=x, y=y[:-1])], "'y'"),
        "too few per class": (["--data", data_file, "--shots", "20"], "per class"),
        "missing data file": (["--data", str(tmp_path / "none.npz")], "no such file"),
        "missing rule dir": (["--data", data_file, "--rule", str(tmp_path / "no-rule")], "no meta-trained rule"),
        "bad activation": (["--data", data_file, "--activation", "sigmoid"], "activation"),
        "bad width": (["--data", data_file, "--width", "0"], "width"),
        "no data": ([], "one of the arguments --data --dataset is required"),
    }
    for name, (args, match) in cases.items():
        argv = ["evaluate", "--rule", rule_dir, *TINY_EVALUATE, "--out", str(out), *args]
        assert run_cli(argv) == 2, name
        line = _error_line(capsys.readouterr().err, argparse=name in ("bad activation", "bad width", "no data"))
        assert any(m.lower() in line.lower() for m in match.split("|")), (name, line)
        assert not out.exists(), name  # nothing written


def test_meta_train_bad_input_exits_2(tmp_path, capsys):
    out = tmp_path / "out"
    cases = {
        "bad activation": (["--activation", "sigmoid"], "activation"),
        "bad estimator": (["--estimator", "sgd"], "estimator"),
        "batch larger than a task": (["--batch", "1000"], "batch"),
        "truncation range": (["--trunc-min", "5", "--trunc-max", "2"], "truncation"),
        "zero steps": (["--steps", "0"], "steps"),
        "clustered weight": (["--clustered-weight", "2"], "clustered"),
    }
    for name, (args, match) in cases.items():
        assert run_cli(["meta-train", "--out", str(out), *TINY_META_TRAIN, *args]) == 2, name
        line = _error_line(capsys.readouterr().err, argparse=name in ("bad activation", "bad estimator", "zero steps"))
        assert match in line.lower(), (name, line)
        assert not (out / cli.THETA_FILE).exists(), name


def test_meta_train_then_evaluate(tmp_path, capsys, data_file):
    rule = tmp_path / "rule"
    assert run_cli(["meta-train", "--out", str(rule), *TINY_META_TRAIN]) == 0
    capsys.readouterr()
    with open(rule / "results.json") as f:
        trained = json.load(f)
    assert {"config", "metrics", "wall_s", "curves"} <= set(trained)
    assert len(trained["curves"]["loss"]["value"]) == 2
    assert all(np.isfinite(trained["curves"]["loss"]["value"]))
    assert {"meta_loss_first", "meta_loss_last"} <= set(trained["metrics"])
    assert os.path.exists(rule / "meta_loss.png")
    theta, config, metadata = mr.load_theta(str(rule / cli.THETA_FILE))
    assert (config.hidden, config.channels) == (4, 2)
    assert metadata["activation"] == "relu" and metadata["batch_size"] == 8

    out = tmp_path / "eval"
    assert run_cli(["evaluate", "--rule", str(rule), "--data", data_file, *TINY_EVALUATE, "--out", str(out)]) == 0
    with open(out / "results.json") as f:
        results = json.load(f)
    metrics = results["metrics"]
    assert set(metrics) == {"rule", "random", "autoencoder", "pca", "raw"}
    for method, per in metrics.items():
        assert set(per) == {"ridge", "logistic"}, method
        for readout, by_shots in per.items():
            summary = by_shots["2"]
            assert 0.0 <= summary["mean"] <= 1.0 and summary["std"] >= 0.0, (method, readout)
            assert summary["n"] == 2 * 2  # seeds x episodes
    # the clusters are separable from the raw input: its ridge readout beats chance (1/3) by far
    assert metrics["raw"]["ridge"]["2"]["mean"] > 0.6
