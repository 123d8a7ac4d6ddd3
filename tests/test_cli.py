"""Tests of ``python -m trainstep train``: exit codes, error lines, results files, determinism.

The CLI runs in-process through :func:`trainstep.cli.run_main` (argparse errors surface as
``SystemExit``, as they do for the real program); one test runs the real ``python -m trainstep``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_data import BAD_NPZ, write_bad_npz  # the bad-file cases, shared with the data tests

from trainstep import cli
from trainstep.data import load_digits

REPO_ROOT = Path(__file__).resolve().parents[1]
EARLIER_RESULTS = b'{"metrics": {"test_accuracy": 0.4242}, "note": "an earlier run"}\n'


def run_cli(argv):
    """Exit code of the CLI run in-process (argparse exits with SystemExit, like the real program)."""
    try:
        return cli.run_main(cli.main, [str(a) for a in argv])
    except SystemExit as e:
        return e.code


def _out_with_earlier_results(folder: Path) -> Path:
    out = folder / "out"
    out.mkdir()
    (out / "results.json").write_bytes(EARLIER_RESULTS)
    return out


def _assert_untouched(out: Path):
    assert (out / "results.json").read_bytes() == EARLIER_RESULTS
    assert sorted(os.listdir(out)) == ["results.json"]  # no checkpoints/, no run_config.json


def _error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Bad data files: exit code 2, one error line, nothing written


@pytest.mark.parametrize("name", sorted(BAD_NPZ))
def test_bad_npz_exits_2_without_writing(name, tmp_path, capsys):
    path, key, problems = write_bad_npz(name, tmp_path)
    out = _out_with_earlier_results(tmp_path)
    rc = run_cli(["train", "--dataset", f"npz:{path}", "--steps", 5, "--out", out, "--no-progress"])
    captured = capsys.readouterr()
    assert rc == cli.EXIT_BAD_INPUT == 2
    line = _error_line(captured.err)
    assert line.startswith(f"error: {path}: "), line
    if key is not None:
        assert f"'{key}'" in line, line
    for p in problems:
        assert p in line, line
    assert "test accuracy" not in captured.out
    _assert_untouched(out)


def test_real_subprocess_bad_npz(tmp_path):
    path, key, _ = write_bad_npz("nan_x_train", tmp_path)
    out = _out_with_earlier_results(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "trainstep", "train", "--dataset", f"npz:{path}", "--steps", "5",
         "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = _error_line(proc.stderr)
    assert path in line and f"'{key}'" in line and "non-finite" in line
    assert proc.stdout == ""
    _assert_untouched(out)


# ---------------------------------------------------------------------------------------------
# Bad arguments: exit code 2, no traceback


@pytest.mark.parametrize("args,mentions", [
    (["--steps", "0"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--l2", "-0.1"], "--l2"),
    (["--model", "cnn"], "--model"),
    (["--optimizer", "lbfgs"], "--optimizer"),
    (["--dataset", "unknown"], "unknown dataset 'unknown'"),
    (["--val-fraction", "1"], "--val-fraction"),
    (["--dataset", "digits", "--batch", "5000"], "--batch 5000"),
])
def test_bad_arguments_exit_2(args, mentions, tmp_path, capsys):
    out = tmp_path / "out"
    rc = run_cli(["train", "--out", out, "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert "error:" in err and mentions in err, err
    assert not out.exists()


def test_missing_out_and_command_exit_2(capsys):
    assert run_cli(["train", "--dataset", "digits"]) == 2
    assert "--out" in capsys.readouterr().err
    assert run_cli([]) == 2
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Successful runs


def test_tiny_run_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    rc = run_cli(["train", "--dataset", "digits", "--steps", 30, "--model", "linear", "--no-progress",
                  "--out", out, "--seed", 3, "--batch", 50, "--checkpoint-every", 15])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["config"] == cli.train_config(dataset="digits", model="linear", steps=30, batch=50,
                                                 seed=3, lr=1e-2, val_fraction=0.1)
    m = results["metrics"]
    assert set(m) == {f"{s}_{k}" for s in ("train", "val", "test") for k in ("loss", "accuracy")}
    assert 0.0 <= m["test_accuracy"] <= 1.0
    assert np.isfinite(m["test_loss"]) and m["test_loss"] > 0
    assert results["wall_s"] > 0
    assert results["environment"]["versions"]["jax"] == jax.__version__
    assert results["data"] == load_digits().summary()
    assert results["resumed_from_step"] == 0
    assert len(results["curves"]["loss"]["value"]) > 0
    assert f"test accuracy {m['test_accuracy']:.4f}" in captured.out
    assert (out / "checkpoints").is_dir()
    assert json.loads((out / "run_config.json").read_text()) == results["config"]


LINEAR_300 = ["train", "--dataset", "digits", "--steps", 300, "--model", "linear", "--lr", 0.05,
              "--no-progress", "--checkpoint-every", 100]


def test_linear_digits_deterministic_accurate_and_reported_correctly(tmp_path, capsys):
    # Run 1: the CLI. Run 2: the same configuration through the library API into another folder,
    # capturing the final state (for an independent recomputation of the reported metrics).
    a = tmp_path / "a"
    assert run_cli([*LINEAR_300, "--out", a]) == 0
    assert "Traceback" not in capsys.readouterr().err
    ra = json.loads((a / "results.json").read_text())
    captured = {}
    config = cli.train_config(dataset="digits", model="linear", steps=300, lr=0.05)
    assert ra["config"] == config
    rb = cli.train_classifier(config, str(tmp_path / "b"), checkpoint_every=100, progress=False,
                              on_chunk=lambda done, state: captured.update(done=done, state=state))
    assert rb == json.loads((tmp_path / "b" / "results.json").read_text())
    assert ra["metrics"] == rb["metrics"]  # bitwise-identical floats
    assert ra["curves"] == rb["curves"]
    assert ra["metrics"]["test_accuracy"] > 0.85  # digits is easy for logistic regression

    assert captured["done"] == 300
    dense = captured["state"].params["params"]["Dense_0"]
    w, bias = np.asarray(dense["kernel"], np.float64), np.asarray(dense["bias"], np.float64)
    data = load_digits()
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        logits = x.astype(np.float64) @ w + bias
        acc = np.mean(np.argmax(logits, axis=1) == y)
        logz = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
        xent = np.mean(logz - logits[np.arange(len(y)), y])
        assert ra["metrics"][f"{split}_accuracy"] == pytest.approx(acc, abs=1e-6)
        assert ra["metrics"][f"{split}_loss"] == pytest.approx(xent, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Divergence: exit code 3


def test_non_finite_loss_exits_3(tmp_path, capsys):
    out = tmp_path / "div"
    rc = run_cli(["train", "--dataset", "digits", "--model", "mlp", "--lr", "1e30", "--optimizer", "sgd",
                  "--steps", 30, "--no-progress", "--out", out])
    captured = capsys.readouterr()
    assert rc == cli.EXIT_NON_FINITE == 3
    line = _error_line(captured.err)
    m = re.search(r"non-finite loss at step (\d+)", line)
    assert m, line
    assert 0 < int(m.group(1)) < 30  # step 0's loss is computed at the finite initial parameters
    assert not (out / "results.json").exists()
    assert "test accuracy" not in captured.out
