"""The experiment runner: chunks, checkpoints, resume, non-finite stop, atomic results."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trainstep import ConfigError, NonFiniteLossError, TrainStep, gradient_step, minibatch_fn, run_chunked
from trainstep.cli import train_classifier, train_config
from trainstep.runner import write_json_atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _regression_run():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(128, 6)), jnp.float32)
    y = x @ jnp.arange(6.0) + jnp.asarray(rng.normal(size=128), jnp.float32)

    def loss_fn(w, batch, h, key):
        xb, yb = batch
        return jnp.mean((xb @ w - yb) ** 2) + 1e-3 * jax.random.normal(key, ()), None

    ts = gradient_step(loss_fn, lambda h: optax.adam(h["learning_rate"]))
    hp = {"learning_rate": jnp.float32(0.05)}
    bf = minibatch_fn((x, y), 16, mode="epoch", key=jax.random.key(3))
    return ts, ts.init(jnp.zeros(6), hp), hp, bf


class Interrupt(Exception):
    pass


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path):
    ts, state, hp, bf = _regression_run()
    kw = dict(key=jax.random.key(0), num_steps=50, batch_fn=bf, config={"run": 1}, chunk_size=10, progress=False)
    whole = run_chunked(ts, state, hp, out_dir=str(tmp_path / "a"), **kw)

    def stop_after_two_chunks(done, s):
        if done == 20:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_chunked(ts, state, hp, out_dir=str(tmp_path / "b"), on_chunk=stop_after_two_chunks, **kw)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["20"]
    resumed = run_chunked(ts, state, hp, out_dir=str(tmp_path / "b"), **kw)
    assert resumed.resumed_from == 20 and whole.resumed_from == 0
    chex.assert_trees_all_equal(resumed.state, whole.state)
    chex.assert_trees_all_equal(resumed.history, whole.history)
    # A finished run resumed once more does no further work and returns the same state.
    again = run_chunked(ts, state, hp, out_dir=str(tmp_path / "b"), **kw)
    assert again.resumed_from == 50
    chex.assert_trees_all_equal(again.state, whole.state)


def test_chunk_size_does_not_change_the_result():
    ts, state, hp, bf = _regression_run()
    kw = dict(key=jax.random.key(0), num_steps=30, batch_fn=bf, out_dir=None, config={}, progress=False)
    a = run_chunked(ts, state, hp, chunk_size=30, **kw)
    b = run_chunked(ts, state, hp, chunk_size=7, **kw)
    chex.assert_trees_all_close(a.state, b.state, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-6)


def test_non_finite_loss_stops_at_the_step_and_keeps_last_finite_checkpoint(tmp_path):
    """A step whose loss becomes NaN at global step 23: the error names step 23 and the
    checkpoint of steps [0, 20) survives."""

    def init(w):
        return (jnp.zeros((), jnp.int32), w)

    def step(state, batch, h, key):
        t, w = state
        loss = jnp.where(t >= 23, jnp.nan, jnp.sum(w ** 2))
        return (t + 1, w * 0.9), {"loss": loss}

    ts = TrainStep(init, step)
    kw = dict(key=jax.random.key(0), num_steps=50, batch_fn=lambda k, t: None, config={}, chunk_size=10,
              progress=False)
    out = str(tmp_path / "nan")
    message = r"non-finite loss at step 23: training stopped; the last finite checkpoint \(after 20 steps\)"
    with pytest.raises(NonFiniteLossError, match=message) as info:
        run_chunked(ts, ts.init(jnp.ones(3)), None, out_dir=out, **kw)
    assert info.value.step == 23
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["20"]
    assert not os.path.exists(os.path.join(out, "results.json"))


def test_non_finite_state_is_caught_even_when_the_loss_is_finite():
    def step(w, batch, h, key):
        return w * jnp.inf, {"loss": jnp.float32(0.0)}

    message = r"after step 4 \(checked once per chunk\).*no checkpoint had been written"
    with pytest.raises(NonFiniteLossError, match=message):
        run_chunked(step, jnp.ones(2), None, key=jax.random.key(0), num_steps=10, batch_fn=lambda k, t: None,
                    out_dir=None, config={}, chunk_size=5, progress=False)


def test_resuming_with_another_config_is_refused(tmp_path):
    ts, state, hp, bf = _regression_run()
    kw = dict(key=jax.random.key(0), num_steps=10, batch_fn=bf, chunk_size=5, progress=False,
              out_dir=str(tmp_path))
    run_chunked(ts, state, hp, config={"lr": 0.05}, **kw)
    with pytest.raises(ConfigError, match=r"different run \(differs in \['lr'\]\)"):
        run_chunked(ts, state, hp, config={"lr": 0.1}, **kw)


def test_write_json_atomic_never_leaves_a_half_written_file(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(str(path), {"a": np.float32(1.5), "b": jnp.arange(3)})
    before = path.read_bytes()
    assert json.loads(before) == {"a": 1.5, "b": [0, 1, 2]}
    with pytest.raises(TypeError):
        write_json_atomic(str(path), {"a": 1, "bad": object()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def test_train_classifier_resume_gives_the_same_results(tmp_path):
    config = train_config(dataset="digits", model="linear", steps=60, batch=32, lr=0.05, seed=1)
    whole = train_classifier(config, str(tmp_path / "a"), checkpoint_every=20, progress=False)

    def interrupt(done, s):
        if done == 40:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_classifier(config, str(tmp_path / "b"), checkpoint_every=20, progress=False, on_chunk=interrupt)
    assert not os.path.exists(tmp_path / "b" / "results.json")
    resumed = train_classifier(config, str(tmp_path / "b"), checkpoint_every=20, progress=False)
    assert resumed["metrics"] == whole["metrics"]
    assert resumed["curves"] == whole["curves"]
    assert resumed["resumed_from_step"] == 40


def test_killed_process_resumes_to_the_same_results(tmp_path):
    """A real interruption: SIGKILL the CLI once it has written a checkpoint, then run it again."""
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    args = [sys.executable, "-m", "trainstep", "train", "--dataset", "digits", "--model", "mlp", "--steps", "1500",
            "--batch", "32", "--lr", "0.01", "--checkpoint-every", "50", "--no-progress"]
    ref = subprocess.run(args + ["--out", str(tmp_path / "ref")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = out / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("the run finished before it could be killed")
    assert not (out / "results.json").exists()

    resumed = subprocess.run(args + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "ref" / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert b["resumed_from_step"] > 0
    assert a["metrics"] == b["metrics"]
    assert a["curves"] == b["curves"]
