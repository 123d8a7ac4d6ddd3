"""Tests of the MNIST-1D/digits MLP harness of ``stn_jax``: the ``mlp`` and ``schedule`` CLIs
(bad input, the results contract) and right answers of the pieces they are built from (replay of a
constant schedule is the fixed run, a vmapped batch of trials is the trials one by one, searches
select the lowest validation loss).

Everything runs tiny (a few dozen weight steps, one hidden layer of 8 units, the digits dataset):
the point is the plumbing and exact identities, not accuracy.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from stn_jax import baselines, cli, schedule
from stn_jax.mlp import (
    SEARCH_SPACE,
    MLPSetup,
    load_data,
    mlp_space,
    train_fixed,
    train_fixed_batch,
    train_schedule,
    train_stn,
)
from trainstep.cli import run_main

SETUP = MLPSetup(dataset="digits", hidden=(8,), batch=32, steps=24)
# 26 steps: 4 of warm-up, 4 STN cycles of 5 weight steps, a tail of 2 at the final values.
TINY_MLP = ["--dataset", "digits", "--steps", "26", "--hidden", "8", "--stn-warmup", "4", "--no-progress"]
TINY_SCHEDULE = ["--dataset", "digits", "--steps", "24", "--hidden", "8", "--warmup", "4", "--seeds", "2",
                 "--no-progress"]
CONTRACT = ("val_loss", "test_loss", "test_accuracy", "cost_runs", "wall_s", "per_seed")


def run_cli(argv):
    """Exit code of the CLI run in-process (argparse exits with SystemExit, like the real program)."""
    try:
        return run_main(cli.main, [str(a) for a in argv])
    except SystemExit as e:
        return e.code


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def data():
    return load_data(SETUP)


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one error line, nothing written


@pytest.mark.parametrize("args", [
    ["--dataset", "cifar"],
    ["--seeds", "0"],
    ["--seeds", "two"],
    ["--budget", "0"],
    ["--steps", "1"],
    ["--steps", "1e3"],
    ["--methods", "stn,bogus"],
    ["--methods", "stn,stn"],
    ["--methods", ","],
    ["--hidden", "8,x"],
    ["--hidden", "0"],
    ["--steps", "100", "--stn-warmup", "100"],
    ["--steps", "100", "--stn-warmup", "98", "--t-train", "5"],
    ["--hyper-lr", "0"],
    ["--hyper-lr", "nan"],
    ["--lr", "0"],
    ["--lr", "fast"],
    ["--entropy-weight", "-1"],
    ["--t-train", "0"],
    ["--optuna-batch", "0"],
])
def test_mlp_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, args):
    out = tmp_path / "run"
    assert run_cli(["mlp", *args, "--out", out]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: "), line
    assert not out.exists()


@pytest.mark.parametrize("args", [
    ["--hparam", "learning_rate"],
    ["--dataset", "cifar"],
    ["--seeds", "0"],
    ["--steps", "x"],
    ["--hidden", "8,8,8"],
    ["--warmup", "-1"],
    ["--steps", "20", "--warmup", "20"],
    ["--hyper-lr", "-1"],
    ["--entropy-weight", "inf"],
    ["--grid", "0.1"],  # a grid needs two values
    ["--grid", "0.1,a"],
    ["--hparam", "dropout1", "--grid", "0.1,0.99"],  # outside (0, 0.95)
    ["--hparam", "weight_decay", "--inits", "0"],  # not > 0
])
def test_schedule_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, args):
    out = tmp_path / "run"
    assert run_cli(["schedule", *args, "--out", out]) == 2
    _one_error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("command", ["mlp", "schedule"])
def test_out_is_a_file_exits_2(tmp_path, capsys, command):
    f = tmp_path / "file"
    f.write_text("x")
    assert run_cli([command, "--out", f]) == 2
    assert "not a folder" in _one_error_line(capsys.readouterr().err)
    assert f.read_text() == "x" and os.listdir(tmp_path) == ["file"]


# ---------------------------------------------------------------------------------------------
# A tiny run of each CLI: the results contract


@pytest.fixture(scope="module")
def mlp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp")
    argv = ["mlp", *TINY_MLP, "--seeds", "1", "--budget", "2", "--optuna-batch", "2", "--out", out]
    if not baselines.optuna_available():
        argv += ["--methods", ",".join(m for m in baselines.METHODS if m != "optuna")]
    assert run_cli(argv) == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_mlp_cli_writes_the_contract(mlp_results):
    out, r = mlp_results
    expected = [m for m in baselines.METHODS if m != "optuna" or baselines.optuna_available()]
    assert list(r["methods"]) == expected
    for name, m in r["methods"].items():
        for key in CONTRACT:
            assert key in m, (name, key)
        for key in CONTRACT[:-1]:
            assert np.isfinite(m[key]), (name, key, m[key])
        assert 0.0 <= m["test_accuracy"] <= 1.0 and m["wall_s"] > 0 and m["cost_runs"] > 0
        assert len(m["per_seed"]) == 1
        # The summary is the mean of the per-seed values.
        np.testing.assert_allclose(m["test_accuracy"], np.mean([s["test_accuracy"] for s in m["per_seed"]]))
    assert r["methods"]["fixed"]["cost_runs"] == 1.0
    assert r["methods"]["random"]["cost_runs"] == 2.0 and r["methods"]["grid"]["cost_runs"] == 2.0
    assert r["data"]["dataset"] == "digits" and r["config"]["steps"] == 26
    target = r["metrics"]["target"]
    assert target["evaluated"] and target["budget_is_target"] is False
    best = max(("random", "grid"), key=lambda k: r["methods"][k]["test_accuracy"])
    assert target["holds"] == (r["methods"]["stn"]["test_accuracy"] >= r["methods"][best]["test_accuracy"]
                               and r["methods"]["stn"]["cost_runs"] <= 2.5)
    for png in ("cost.png", "schedules.png"):
        assert (out / png).stat().st_size > 0


def test_mlp_stn_schedule_is_recorded_per_weight_step(mlp_results):
    """STN's schedule (every weight step of this short run) holds the initial values through the
    warm-up and the first cycle, each later cycle's values for its 5 steps, and the final values
    in the tail after the last cycle."""
    _, r = mlp_results
    init = mlp_space().values(mlp_space().init_unconstrained())
    for method in ("stn", "delta-stn"):
        run = r["methods"][method]["per_seed"][0]
        sched = run["schedule"]
        assert sched["step"] == list(range(26))
        for name, v in init.items():
            s = np.asarray(sched[name])
            np.testing.assert_allclose(s[:9], v, rtol=1e-6)  # warm-up (4) and the first cycle (5)
            for c in range(4):
                assert np.all(s[4 + 5 * c: 9 + 5 * c] == s[4 + 5 * c]), (method, name, c)
            np.testing.assert_allclose(s[-2:], run["hparams"][name], rtol=1e-6)
        assert any(abs(run["hparams"][k] - v) > 1e-6 for k, v in init.items())  # the hyper steps moved them


def test_mlp_stn_frozen_keeps_the_initial_hyperparameters(mlp_results):
    """The ``stn-frozen`` control (hyper step size 0) trains the best-response network but never
    moves the hyperparameters: its schedule is the initial values at every step."""
    _, r = mlp_results
    init = mlp_space().values(mlp_space().init_unconstrained())
    run = r["methods"]["stn-frozen"]["per_seed"][0]
    for name, v in init.items():
        np.testing.assert_allclose(run["schedule"][name], v, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(run["hparams"][name], v, rtol=1e-6, err_msg=name)
    assert run["val_loss"] != r["methods"]["stn"]["per_seed"][0]["val_loss"]


def test_mlp_searches_select_the_lowest_validation_loss(mlp_results):
    _, r = mlp_results
    for name in ("random", "grid", "optuna"):
        if name not in r["methods"]:
            continue
        run = r["methods"][name]["per_seed"][0]
        val = [t["val_loss"] for t in run["trials"]]
        assert run["chosen_trial"] == int(np.argmin(val))
        chosen = run["trials"][run["chosen_trial"]]
        for key in ("val_loss", "test_loss", "test_accuracy"):
            assert run[key] == chosen[key], (name, key)
        assert run["hparams"] == chosen["hparams"]
        np.testing.assert_allclose(run["best_so_far"], np.minimum.accumulate(val))


def test_schedule_cli_writes_the_table(tmp_path):
    out = tmp_path / "run"
    assert run_cli(["schedule", *TINY_SCHEDULE, "--grid", "0.1,0.5", "--inits", "0.1,0.6", "--out", out]) == 0
    with open(out / "results.json") as f:
        r = json.load(f)
    rows = r["study"]["rows"]
    assert set(rows) == set(schedule.ROW_LABELS)
    for name, row in rows.items():
        assert len(row["per_seed"]) == 2
        for key in ("val_loss", "test_loss", "test_accuracy"):
            assert np.isfinite(row[key]) and key in r["metrics"][name]
            np.testing.assert_allclose(row[key], np.mean([s[key] for s in row["per_seed"]]), rtol=1e-6)
    grid = r["study"]["grid"]
    # The best fixed value is the grid value with the lowest mean validation loss.
    means = [g["val_loss"] for g in grid["runs"]]
    assert grid["best_index"] == int(np.argmin(means)) and grid["best"] == grid["values"][grid["best_index"]]
    assert rows["best_fixed"]["val_loss"] == means[grid["best_index"]]
    # The STN row is the sweep's first initial value; the sweep has a trajectory per init and seed.
    sweep = r["study"]["init_sweep"]
    assert sweep["inits"] == [0.1, 0.6]
    assert np.asarray(sweep["trajectories"]).shape[:2] == (2, 2)
    assert rows["stn"]["per_seed"] == sweep["runs"][0]["per_seed"]
    np.testing.assert_allclose(rows["final_fixed"]["value"], np.asarray(sweep["final_values"])[0], rtol=1e-6)
    # The verdicts are computed from the rows.
    t = r["study"]["targets"]["val_loss"]
    assert t["stn_at_least_best_fixed"] == (rows["stn"]["val_loss"] <= rows["best_fixed"]["val_loss"])
    assert t["final_fixed_worse_than_stn"] == (rows["final_fixed"]["val_loss"] > rows["stn"]["val_loss"])
    for png in ("trajectories.png", "rows.png"):
        assert (out / png).stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# Right answers of the building blocks


def test_replaying_a_constant_schedule_is_the_fixed_run(data):
    values = {"input_dropout": 0.1, "dropout1": 0.3, "dropout2": 0.2, "input_noise": 0.05,
              "weight_decay": 1e-3, "shift": 0.1}
    fixed = train_fixed(SETUP, data, values, seed=3)
    replay = train_schedule(SETUP, data, {k: np.full(SETUP.steps, v) for k, v in values.items()}, seed=3)
    for key in ("val_loss", "val_accuracy", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(replay[key], fixed[key], rtol=1e-5, err_msg=key)


class _CountCompiles:
    """Number of XLA backend compilations while the context is open."""

    def __enter__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def _listen(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def test_a_second_seed_reuses_the_compiled_programs(data):
    """Seed-dependent keys, initial states and data are program arguments, not constants: once a
    configuration has run for one seed, other seeds compile nothing (and give other results)."""
    one = train_fixed(SETUP, data, {"dropout1": 0.1}, seed=0)
    with _CountCompiles() as clock:
        two = train_fixed(SETUP, data, {"dropout1": 0.1}, seed=1)
    assert clock.count == 0 and one["val_loss"] != two["val_loss"]
    s1 = train_stn(SETUP, data, seed=0, warmup=4)
    with _CountCompiles() as clock:
        s2 = train_stn(SETUP, data, seed=1, warmup=4)
    assert clock.count == 0 and s1["val_loss"] != s2["val_loss"]


def test_a_vmapped_batch_of_trials_equals_the_trials_one_by_one(data):
    values = {"dropout1": [0.0, 0.5], "weight_decay": [1e-4, 1e-2], "shift": [0.2, 0.0], "input_noise": [0.1, 0.0]}
    batch = train_fixed_batch(SETUP, data, values, seed=1)
    for i in range(2):
        one = train_fixed(SETUP, data, {k: v[i] for k, v in values.items()}, seed=1)
        for key in ("val_loss", "val_accuracy", "test_loss", "test_accuracy"):
            np.testing.assert_allclose(batch[key][i], one[key], rtol=1e-4, atol=1e-6, err_msg=f"{key} trial {i}")
    assert batch["val_loss"][0] != batch["val_loss"][1]


def test_schedule_study_plain_runs_equal_the_mlp_replay(data):
    """``stn_jax.schedule.plain_runs`` (vmapped over rows) is ``stn_jax.mlp.train_schedule`` with the
    untuned hyperparameters at 0."""
    ramp = np.linspace(0.05, 0.6, SETUP.steps).astype(np.float32)
    rows = schedule.plain_runs(SETUP, data, "dropout1", np.stack([np.full(SETUP.steps, 0.3), ramp]), [0, 2])
    one = train_schedule(SETUP, data, {**{k: np.zeros(SETUP.steps) for k in mlp_space().names}, "dropout1": ramp},
                         seed=2)
    for key in ("val_loss", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(rows[key][1], one[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert rows["val_loss"][0] != rows["val_loss"][1]


def test_search_selection_and_settings():
    assert baselines.select_by_validation([0.5, np.nan, 0.2, 0.3]) == 2
    assert baselines.select_by_validation([np.inf, 0.9]) == 1
    np.testing.assert_allclose(baselines.best_so_far([0.5, 0.7, np.nan, 0.2, 0.3]), [0.5, 0.5, 0.5, 0.2, 0.2])
    assert baselines.grid_levels(10) == (2, 2, 2) and baselines.grid_levels(27) == (3, 3, 3)
    assert baselines.grid_levels(2) == (2, 1, 1) and baselines.grid_levels(1) == (1, 1, 1)
    g = baselines.grid_values(10)
    assert all(len(v) == 8 for v in g.values())
    # Quartiles of each range; the three dropouts share a level, noise and shift move together.
    np.testing.assert_allclose(sorted(set(g["dropout1"].tolist())), [0.125, 0.375], rtol=1e-6)
    np.testing.assert_allclose(sorted(set(g["weight_decay"].tolist())), [1e-5, 1e-3], rtol=1e-5)
    assert np.array_equal(g["input_dropout"], g["dropout2"])
    assert len(set(zip(g["input_noise"].tolist(), g["shift"].tolist(), strict=True))) == 2
    assert len({tuple(row) for row in np.stack(list(g.values()), 1).tolist()}) == 8  # all distinct
    r1, r2 = baselines.random_values(50, seed=4), baselines.random_values(50, seed=4)
    for name, (low, high, _) in SEARCH_SPACE.items():
        assert np.array_equal(r1[name], r2[name])
        assert np.all(r1[name] >= low * (1 - 1e-6)) and np.all(r1[name] <= high * (1 + 1e-6))
    assert not np.array_equal(baselines.random_values(50, seed=5)["dropout1"], r1["dropout1"])


def test_centre_at_init_starts_at_the_plain_network_and_is_stn_only(data):
    """With the hypernetwork fed the offset from the initial values, the untrained best-response
    network at the initial values is exactly the plain network of its general weights; with the raw
    unconstrained values it is not (the response modulates every unit)."""
    import jax.numpy as jnp

    from stn_jax import mlp
    from stn_jax.stn import STNConfig
    from trainstep.runner import ConfigError

    params = mlp.init_params(jax.random.key(0), data.num_features, data.num_classes, SETUP.hidden, 6)
    x = jnp.asarray(data.x_val[:16])
    plain = mlp.predict_plain(params, x, {}, jax.random.key(0), False)
    outs = {}
    for centre in (True, False):
        stn, *_, predict_program = mlp._stn_programs(SETUP, (), False, False, 4, 5, 1, 3e-3, 1e-3, True, centre)
        outs[centre] = np.asarray(predict_program(stn.init(params), x))
    np.testing.assert_allclose(outs[True], np.asarray(plain), rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(outs[False] - np.asarray(plain))) > 1e-2
    with pytest.raises(ConfigError, match="centre_at_init"):
        STNConfig(delta=True, centre_at_init=True)
