"""The training-step core: gradient_step and unroll against hand-written references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from trainstep import TrainState, TrainStep, gradient_step, minibatch_fn, unroll
from trainstep.core import auto_checkpoint_levels


def quad_loss(w, batch, hparams, key):
    x, y = batch
    pred = x @ w
    return jnp.mean((pred - y) ** 2) + hparams["l2"] * jnp.sum(w ** 2), {"mean_pred": jnp.mean(pred)}


def noisy_loss(w, batch, hparams, key):
    """Uses the step key, so that key handling is tested too."""
    x, y = batch
    noise = 0.1 * jax.random.normal(key, x.shape)
    return jnp.mean(((x + noise) @ w - y) ** 2) + hparams["l2"] * jnp.sum(w ** 2), None


def _problem(n=64, d=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=d) + 0.1 * rng.normal(size=n)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


HP = {"learning_rate": jnp.float32(0.05), "l2": jnp.float32(1e-2)}


def test_one_sgd_step_matches_hand_computed_update():
    x, y = _problem()
    ts = gradient_step(quad_loss, lambda h: optax.sgd(h["learning_rate"]), log_grad_norm=True)
    w0 = jnp.ones(5, jnp.float32)
    state = ts.init(w0, HP)
    new, metrics = ts.step(state, (x, y), HP, jax.random.key(0))
    grad = 2 * x.T @ (x @ w0 - y) / len(y) + 2 * HP["l2"] * w0
    chex.assert_trees_all_close(new.params, w0 - HP["learning_rate"] * grad, rtol=1e-5)
    assert int(new.step) == 1
    np.testing.assert_allclose(metrics["loss"], jnp.mean((x @ w0 - y) ** 2) + HP["l2"] * w0 @ w0, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], jnp.linalg.norm(grad), rtol=1e-5)
    np.testing.assert_allclose(metrics["mean_pred"], jnp.mean(x @ w0), rtol=1e-6)


def test_fixed_optimizer_and_has_aux_false():
    x, y = _problem()
    ts = gradient_step(lambda w, b, h, k: jnp.mean((b[0] @ w - b[1]) ** 2), optax.sgd(0.1), has_aux=False)
    state = ts.init(jnp.zeros(5))
    new, metrics = ts.step(state, (x, y), None, jax.random.key(0))
    chex.assert_trees_all_close(new.params, 0.1 * 2 * x.T @ y / len(y), rtol=1e-5)
    assert set(metrics) == {"loss"}


class UnrollEqualsLoopTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters("sgd", "adam")
    def test_unroll_equals_python_loop_with_stacked_batches(self, optimizer):
        x, y = _problem()
        make = {"sgd": optax.sgd, "adam": optax.adam}[optimizer]
        ts = gradient_step(noisy_loss, lambda h: make(h["learning_rate"]))
        T = 12
        idx = jax.random.randint(jax.random.key(3), (T, 16), 0, len(y))
        batches = (x[idx], y[idx])
        key = jax.random.key(7)
        state = ts.init(jnp.zeros(5), HP)

        final, metrics = self.variant(lambda s, h: unroll(ts, s, h, key=key, batches=batches))(state, HP)

        ref, losses = state, []
        for t in range(T):
            k_t = jax.random.fold_in(key, t)
            ref, m = ts.step(ref, (batches[0][t], batches[1][t]), HP, jax.random.fold_in(k_t, 1))
            losses.append(m["loss"])
        chex.assert_trees_all_close(final, ref, rtol=1e-5, atol=1e-6)
        chex.assert_shape(metrics["loss"], (T,))
        np.testing.assert_allclose(metrics["loss"], np.array(losses), rtol=1e-5)


def test_unroll_with_batch_fn_equals_python_loop():
    x, y = _problem()
    ts = gradient_step(noisy_loss, lambda h: optax.sgd(h["learning_rate"]))
    batch_fn = minibatch_fn((x, y), 8, mode="iid")
    key = jax.random.key(11)
    state = ts.init(jnp.zeros(5), HP)
    final, _ = jax.jit(lambda s: unroll(ts, s, HP, key=key, num_steps=9, batch_fn=batch_fn))(state)
    ref = state
    for t in range(9):
        k_t = jax.random.fold_in(key, t)
        ref, _ = ts.step(ref, batch_fn(jax.random.fold_in(k_t, 0), jnp.int32(t)), HP, jax.random.fold_in(k_t, 1))
    chex.assert_trees_all_close(final, ref, rtol=1e-5, atol=1e-6)


def test_unroll_accepts_a_bare_step_function_and_legacy_keys():
    x, y = _problem()
    ts = gradient_step(noisy_loss, lambda h: optax.sgd(h["learning_rate"]))
    state = ts.init(jnp.zeros(5), HP)
    bf = minibatch_fn((x, y), 8, mode="iid")
    a, _ = unroll(ts.step, state, HP, key=jax.random.PRNGKey(0), num_steps=4, batch_fn=bf)
    b, _ = unroll(ts, state, HP, key=jax.random.PRNGKey(0), num_steps=4, batch_fn=bf)
    chex.assert_trees_all_equal(a, b)


def test_split_unroll_with_step_offset_equals_one_unroll():
    """The property the runner's resume relies on."""
    x, y = _problem()
    ts = gradient_step(noisy_loss, lambda h: optax.adam(h["learning_rate"]))
    bf = minibatch_fn((x, y), 8, mode="epoch", key=jax.random.key(5))
    key = jax.random.key(1)
    state = ts.init(jnp.zeros(5), HP)
    whole, m_whole = unroll(ts, state, HP, key=key, num_steps=20, batch_fn=bf)
    half, m1 = unroll(ts, state, HP, key=key, num_steps=7, batch_fn=bf)
    rest, m2 = unroll(ts, half, HP, key=key, num_steps=13, batch_fn=bf, step_offset=7)
    chex.assert_trees_all_close(whole, rest, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m_whole["loss"], np.concatenate([m1["loss"], m2["loss"]]), rtol=1e-6)


@pytest.mark.parametrize("checkpoint", [True, 1, 2, 3])
def test_checkpointed_unroll_has_same_values_and_gradients(checkpoint):
    x, y = _problem()
    ts = gradient_step(noisy_loss, lambda h: optax.sgd(h["learning_rate"]))
    bf = minibatch_fn((x, y), 8, mode="iid")
    state = ts.init(jnp.zeros(5), HP)

    def val(h, ckpt):
        final, metrics = unroll(ts, state, h, key=jax.random.key(0), num_steps=37, batch_fn=bf, checkpoint=ckpt)
        return jnp.mean((x @ final.params - y) ** 2), metrics

    (v0, m0), g0 = jax.value_and_grad(val, has_aux=True)(HP, False)
    (v1, m1), g1 = jax.value_and_grad(val, has_aux=True)(HP, checkpoint)
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    chex.assert_trees_all_close(m0, m1, rtol=1e-6)
    chex.assert_trees_all_close(g0, g1, rtol=1e-4, atol=1e-7)


def test_auto_checkpoint_levels_grow_logarithmically():
    assert auto_checkpoint_levels(1) == 1
    assert auto_checkpoint_levels(200) == 3
    assert auto_checkpoint_levels(2000) == 5


def test_changing_hparams_does_not_recompile():
    x, y = _problem()
    ts = gradient_step(quad_loss, lambda h: optax.adam(h["learning_rate"]))
    bf = minibatch_fn((x, y), 8, mode="iid")
    run = jax.jit(lambda s, h: unroll(ts, s, h, key=jax.random.key(0), num_steps=5, batch_fn=bf)[0])
    state = ts.init(jnp.zeros(5), HP)
    a = run(state, HP)
    b = run(state, {"learning_rate": jnp.float32(0.5), "l2": jnp.float32(0.0)})
    assert run._cache_size() == 1
    assert not np.allclose(a.params, b.params)


def test_learning_rate_gradient_matches_finite_differences():
    x, y = _problem()
    with jax.enable_x64(True):
        x64, y64 = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)
        ts = gradient_step(quad_loss, lambda h: optax.adam(h["learning_rate"]))
        idx = jax.random.randint(jax.random.key(3), (15, 16), 0, len(y))
        batches = (x64[idx], y64[idx])

        def f(lr):
            hp = {"learning_rate": lr, "l2": jnp.float64(1e-2)}
            final, _ = unroll(ts, ts.init(jnp.zeros(5, jnp.float64), hp), hp, key=jax.random.key(0), batches=batches)
            return jnp.mean((x64 @ final.params - y64) ** 2)

        lr = jnp.float64(0.03)
        g = jax.grad(f)(lr)
        eps = 1e-6
        fd = (f(lr + eps) - f(lr - eps)) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-5)
        assert abs(float(g)) > 1e-3


def test_bad_arguments_raise_clear_errors():
    x, y = _problem()
    ts = gradient_step(quad_loss, lambda h: optax.sgd(h["learning_rate"]))
    state = ts.init(jnp.zeros(5), HP)
    batches = (x[None], y[None])
    bf = minibatch_fn((x, y), 8, mode="iid")
    with pytest.raises(ValueError, match="exactly one of"):
        unroll(ts, state, HP, key=jax.random.key(0), batches=batches, batch_fn=bf, num_steps=1)
    with pytest.raises(ValueError, match="exactly one of"):
        unroll(ts, state, HP, key=jax.random.key(0), num_steps=1)
    with pytest.raises(ValueError, match="needs num_steps"):
        unroll(ts, state, HP, key=jax.random.key(0), batch_fn=bf)
    with pytest.raises(ValueError, match="num_steps=3 but batches has 1"):
        unroll(ts, state, HP, key=jax.random.key(0), batches=batches, num_steps=3)
    with pytest.raises(ValueError, match="same leading"):
        unroll(ts, state, HP, key=jax.random.key(0), batches=(x[None], y[None, :3].repeat(2, 0)))
    with pytest.raises(TypeError, match="GradientTransformation"):
        gradient_step(quad_loss, lambda h: 0.1).init(jnp.zeros(5), HP)
    with pytest.raises(TypeError, match="TrainStep or a step function"):
        unroll(3, state, HP, key=jax.random.key(0), batches=batches)


def test_trainstep_is_a_plain_namedtuple_of_functions():
    ts = gradient_step(quad_loss, optax.sgd(0.1))
    assert isinstance(ts, TrainStep) and isinstance(ts.init(jnp.zeros(2)), TrainState)
    # The state is a pytree: it goes through jit and tree utilities untouched.
    s = jax.jit(lambda s: s)(ts.init(jnp.zeros(2)))
    assert isinstance(s, TrainState)


def test_conftest_gives_eight_cpu_devices_and_strict_rank_promotion():
    assert jax.device_count() == 8
    with pytest.raises(ValueError, match="jax_numpy_rank_promotion=.raise."):
        jnp.ones(3) + jnp.ones((2, 3))
