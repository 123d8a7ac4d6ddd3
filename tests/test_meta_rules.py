"""Meta-learned unsupervised update rules: properties with a right answer.

θ that outputs nothing leaves the base model alone; the inner trajectory ignores labels; truncated
backprop through ``trainstep.unroll`` of the rule against central finite differences in float64;
antithetic ES against backprop; PES against the full-horizon gradient of a linear-quadratic toy whose
truncated estimate is biased; a step-activation network (no backprop signal) that the rule still
trains; the ridge readout against numpy and scikit-learn; θ files; bad input; the rule as a
``trainstep`` step (``unroll`` equals a Python loop of steps; a vmapped batch of tasks equals the tasks
one by one).

Every test uses tiny sizes; the compiled episode functions are shared through module fixtures.
"""

from __future__ import annotations

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meta_rules as mr
import trainstep
from meta_rules.rule import step_sizes
from trainstep.data import DataError
from trainstep.runner import ConfigError

NUM_CLASSES = 3
DIM = 6
SIZES = (DIM, 5, 4)  # two layers, so the top-down signal goes through V
TASK_CONFIG = mr.TaskConfig(num_classes=NUM_CLASSES, shots=2, queries=3, unlabelled=8)
RULE_CONFIG = mr.RuleConfig(hidden=8, channels=2)
UNROLL_CONFIG = mr.UnrollConfig(sizes=SIZES, activation="tanh", batch_size=4, truncation=(3, 3), length=(9, 9))


@pytest.fixture(scope="module", autouse=True)
def _fast_prng():
    # XLA's CPU compiler takes ~3x longer on the partitionable threefry; no test depends on the random bits.
    with jax.threefry_partitionable(False):
        yield


def pool_task_fn(pool: mr.Task):
    """Tasks drawn from a fixed stack of tasks: one random draw, so episode functions compile fast."""
    n = pool.y_support.shape[0]
    return lambda key: jax.tree.map(lambda a: a[jax.random.randint(key, (), 0, n)], pool)


def sample_pool(key, num=4) -> mr.Task:
    return jax.jit(jax.vmap(mr.clustered_task_fn(DIM, TASK_CONFIG)))(jax.random.split(key, num))


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _key_data(tree):
    """Typed PRNG keys as their integer data, so that chex can compare trees holding them."""
    return jax.tree.map(lambda a: jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a,
                        tree)


def _flat(tree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _cosine(a, b) -> float:
    a, b = _flat(a), _flat(b)
    return float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


@functools.cache
def common():
    """``(theta, pool of tasks, base parameters)`` shared by the tests (also by the chex.TestCase ones)."""
    with jax.threefry_partitionable(False):
        theta = jax.jit(lambda k: mr.init_theta(k, RULE_CONFIG, step_logit=0.0))(jax.random.key(0))
        pool = sample_pool(jax.random.key(1))
        params = jax.jit(lambda k: mr.init_base_mlp(k, SIZES))(jax.random.key(2))
    return theta, pool, params


@pytest.fixture(scope="module")
def theta():
    return common()[0]


@pytest.fixture(scope="module")
def pool():
    return common()[1]


@pytest.fixture(scope="module")
def task(pool):
    return jax.tree.map(lambda a: a[0], pool)


@pytest.fixture(scope="module")
def params():
    return common()[2]


@pytest.fixture(scope="module")
def meta_unroll(pool):
    return mr.make_meta_unroll(pool_task_fn(pool), NUM_CLASSES, UNROLL_CONFIG, RULE_CONFIG)


@pytest.fixture(scope="module")
def unroll_jit(meta_unroll):
    return jax.jit(meta_unroll.unroll)


@pytest.fixture(scope="module")
def tbptt_jit(meta_unroll):
    return jax.jit(lambda th, s, k: mr.truncated_backprop(meta_unroll, th, s, k))


@pytest.fixture(scope="module")
def states(meta_unroll):
    return jax.jit(lambda k: mr.init_states(meta_unroll, k, 3))(jax.random.key(3))


def _batch_fn(x_pool, batch_size=4):
    return lambda k, t: x_pool[jax.random.randint(k, (batch_size,), 0, x_pool.shape[0])]


# ---------------------------------------------------------------------------------------------
# The rule


class ZeroThetaTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_zero_output_or_zero_step_leaves_the_model_unchanged(self):
        theta, pool, params = common()
        x_pool = pool.x_unlabelled[0]
        rule = mr.make_rule_step(RULE_CONFIG, activation="tanh")
        zero_out = {**theta, "out": jax.tree.map(jnp.zeros_like, theta["out"])}
        zero_step = {**theta, "step_logits": jnp.full((3,), -jnp.inf)}

        @self.variant
        def run(th):
            return trainstep.unroll(rule, rule.init(params), th, key=jax.random.key(3), num_steps=5,
                                    batch_fn=_batch_fn(x_pool))

        for th in (zero_out, zero_step):
            state, metrics = run(th)
            chex.assert_trees_all_equal(state.params, params)
            chex.assert_trees_all_equal(metrics["update_rms"], jnp.zeros(5))
            assert int(state.step) == 5
        moved, _ = run(theta)  # the same rule with its outputs on moves every weight
        for a, b in zip(jax.tree.leaves(moved.params), jax.tree.leaves(params), strict=True):
            assert float(jnp.max(jnp.abs(a - b))) > 1e-3
        chex.assert_tree_all_finite(moved.params)


class TestRuleStep:
    def test_step_sizes_are_bounded(self, theta):
        for logit in (-50.0, 0.0, 50.0):
            s = step_sizes({**theta, "step_logits": jnp.full((3,), logit)}, RULE_CONFIG)
            assert bool(jnp.all((s >= 0) & (s <= RULE_CONFIG.max_step)))
        chex.assert_trees_all_close(step_sizes(theta, RULE_CONFIG), jnp.full((3,), RULE_CONFIG.max_step / 2))

    def test_updates_are_normalised_per_receptive_field(self, theta, task, params):
        updates = jax.jit(lambda th, p, x: mr.rule_updates(th, p, x, config=RULE_CONFIG, activation="tanh"))(
            theta, params, task.x_unlabelled[:8])
        for u, p in zip(updates, params, strict=True):
            chex.assert_trees_all_equal_shapes(u, p)
            # each column has the root-mean-square 1/sqrt(fan_in) of the initial weights (up to the eps that
            # keeps a vanishing update from being blown up: slightly below it, never above)
            for name in ("w", "v"):
                rms = jnp.sqrt(jnp.mean(u[name] ** 2, axis=0)) * jnp.sqrt(u[name].shape[0])
                assert bool(jnp.all(rms <= 1.0 + 1e-5)), rms
                chex.assert_trees_all_close(rms, jnp.ones_like(rms), atol=1e-2)
            rms_b = jnp.sqrt(jnp.mean(u["b"] ** 2))
            assert float(rms_b) <= 1.0 + 1e-5
            chex.assert_trees_all_close(rms_b, 1.0, atol=1e-2)

    def test_unroll_equals_a_python_loop_of_steps(self, theta, task, params):
        rule = mr.make_rule_step(RULE_CONFIG, activation="relu")
        key, batch_fn = jax.random.key(6), _batch_fn(task.x_unlabelled)
        final, metrics = jax.jit(lambda th: trainstep.unroll(rule, rule.init(params), th, key=key, num_steps=4,
                                                             batch_fn=batch_fn))(theta)
        step = jax.jit(rule.step)
        state, by_hand = rule.init(params), []
        for t in range(4):
            key_t = jax.random.fold_in(key, t)
            state, m = step(state, batch_fn(jax.random.fold_in(key_t, 0), t), theta, jax.random.fold_in(key_t, 1))
            by_hand.append(m)
        chex.assert_trees_all_close(final, state, rtol=1e-5, atol=1e-6)
        chex.assert_trees_all_close(metrics, jax.tree.map(lambda *m: jnp.stack(m), *by_hand), rtol=1e-5, atol=1e-7)
        assert _max_diff(final.params, params) > 1e-3

    def test_a_users_plain_mlp_of_another_shape(self, theta, task):
        """One θ trains any width and depth; a plain ``[(W, b), ...]`` MLP gets fresh backward weights."""
        rng = np.random.default_rng(0)
        sizes = (DIM, 16, 12, 7)
        dense = [(rng.normal(size=(m, n)).astype(np.float32) / np.sqrt(m), np.zeros(n, np.float32))
                 for m, n in zip(sizes[:-1], sizes[1:], strict=True)]
        params = mr.with_backward_weights(dense, jax.random.key(7))
        assert mr.check_params(params) == sizes
        new, metrics = jax.jit(lambda th, p: mr.apply_rule(th, p, task.x_unlabelled, num_steps=2,
                                                           key=jax.random.key(8), config=RULE_CONFIG, batch_size=4,
                                                           activation="leaky_relu"))(theta, params)
        chex.assert_trees_all_equal_shapes(new, params)
        chex.assert_tree_all_finite(new)
        chex.assert_shape(metrics["update_rms"], (2,))
        for (w, _), layer in zip(dense, new, strict=True):
            assert float(jnp.max(jnp.abs(layer["w"] - w))) > 1e-3


class TestStepActivation:
    def test_no_backprop_signal_yet_the_rule_trains_it(self, theta, task, params):
        def readout(p):
            return mr.task_readout_loss(p, task, num_classes=NUM_CLASSES, activation="step")[0]

        loss, grads = jax.jit(jax.value_and_grad(readout))(params)
        assert 0.0 < float(loss) < 2.0
        chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, params))  # backprop sees nothing

        new, _ = jax.jit(lambda th, p: mr.apply_rule(th, p, task.x_unlabelled, num_steps=3, key=jax.random.key(11),
                                                     config=RULE_CONFIG, batch_size=4, activation="step"))(theta,
                                                                                                          params)
        for layer, old in zip(new, params, strict=True):
            for name in ("w", "v", "b"):
                assert float(jnp.max(jnp.abs(layer[name] - old[name]))) > 1e-3, name
        rep = jax.jit(lambda p: mr.representation(p, task.x_query, activation="step"))
        assert bool(jnp.any(rep(params) != rep(new)))  # the binary features themselves changed

    def test_backprop_meta_gradient_is_zero_but_es_is_not(self, theta, pool):
        config = mr.UnrollConfig(sizes=(DIM, 5), activation="step", batch_size=4, truncation=(2, 2), length=(9, 9))
        mu = mr.make_meta_unroll(pool_task_fn(pool), NUM_CLASSES, config, RULE_CONFIG)

        @jax.jit
        def both(th, key):
            states = mr.init_states(mu, key, 2)
            k = jax.random.fold_in(key, 1)
            return mr.truncated_backprop(mu, th, states, k), mr.antithetic_es(mu, th, states, k, sigma=0.1)

        tb, es = both(theta, jax.random.key(12))
        chex.assert_trees_all_equal(tb.grad, jax.tree.map(jnp.zeros_like, theta))
        chex.assert_tree_all_finite(es.grad)
        assert float(jnp.linalg.norm(_flat(es.grad))) > 0.0


# ---------------------------------------------------------------------------------------------
# The meta-objective and its gradients


class TestMetaUnroll:
    def test_inner_trajectory_does_not_depend_on_labels(self, theta, states, unroll_jit):
        state = jax.tree.map(lambda a: a[0], states)
        task = state.task
        relabelled = task._replace(y_support=(task.y_support + 1) % NUM_CLASSES, y_query=jnp.flip(task.y_query))
        key = jax.random.key(14)
        s1, loss1, _ = unroll_jit(theta, state, key)
        s2, loss2, _ = unroll_jit(theta, state._replace(task=relabelled), key)
        chex.assert_trees_all_equal(s1.rule_state, s2.rule_state)  # identical parameters, bit for bit
        assert _max_diff(s1.rule_state.params, state.rule_state.params) > 1e-3  # and they did move
        assert abs(float(loss1) - float(loss2)) > 1e-4  # the labels reach the readout alone

    def test_truncations_continue_the_episode_and_reset_at_its_end(self, theta, states, unroll_jit):
        state, dones = jax.tree.map(lambda a: a[0], states), []
        for i in range(3):  # length 9 = 3 truncations of 3 steps
            assert int(state.rule_state.step) == 3 * i
            state, loss, done = unroll_jit(theta, state, jax.random.key(20 + i))
            assert np.isfinite(float(loss))
            dones.append(bool(done))
        assert dones == [False, False, True]
        assert int(state.rule_state.step) == 0

    def test_vmapped_tasks_equal_tasks_one_by_one(self, theta, meta_unroll, states, unroll_jit, tbptt_jit):
        keys = jax.random.split(jax.random.key(15), 3)
        batched = jax.jit(jax.vmap(meta_unroll.unroll, in_axes=(None, 0, 0)))(theta, states, keys)
        for i in range(3):
            single = unroll_jit(theta, jax.tree.map(lambda a: a[i], states), keys[i])
            chex.assert_trees_all_close(_key_data(single), _key_data(jax.tree.map(lambda a: a[i], batched)),
                                        rtol=1e-5, atol=1e-6)
        # The estimator's mean gradient over three tasks equals the mean of each task's gradient, computed by the
        # same program on three copies of that task (with a fixed truncation and no episode ending, a task's
        # result does not depend on its key).
        key = jax.random.key(16)
        batch = tbptt_jit(theta, states, key)
        per_task = [tbptt_jit(theta, jax.tree.map(lambda a: jnp.repeat(a[i:i + 1], 3, axis=0), states), key)
                    for i in range(3)]
        chex.assert_trees_all_close(batch.loss, jnp.mean(jnp.stack([o.loss for o in per_task])), rtol=1e-5)
        chex.assert_trees_all_close(batch.grad, jax.tree.map(lambda *g: jnp.mean(jnp.stack(g), axis=0),
                                                             *[o.grad for o in per_task]), rtol=1e-4, atol=1e-7)
        for i, o in enumerate(per_task):
            chex.assert_trees_all_close(_key_data(jax.tree.map(lambda a: a[i], batch.states)),
                                        _key_data(jax.tree.map(lambda a: a[0], o.states)), rtol=1e-5, atol=1e-6)
        assert float(jnp.linalg.norm(_flat(batch.grad))) > 1e-4
        assert _cosine(per_task[0].grad, per_task[1].grad) < 0.999  # the tasks do differ

    def test_meta_gradient_matches_finite_differences_float64(self):
        with jax.enable_x64(True):
            pool = sample_pool(jax.random.key(16), num=2)
            chex.assert_type(pool.x_unlabelled, jnp.float64)
            mu = mr.make_meta_unroll(pool_task_fn(pool), NUM_CLASSES, UNROLL_CONFIG, RULE_CONFIG)
            theta = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), common()[0])
            states = jax.jit(lambda k: mr.init_states(mu, k, 2))(jax.random.key(17))
            key = jax.random.key(18)
            keys = jax.random.split(key, 2)  # truncated_backprop's per-task keys

            @jax.jit
            def mean_loss(th):
                return jnp.mean(jax.vmap(lambda s, k: mu.unroll(th, s, k)[1])(states, keys))

            out = jax.jit(lambda th: mr.truncated_backprop(mu, th, states, key))(theta)
            chex.assert_trees_all_close(out.loss, mean_loss(theta), rtol=1e-12)
            assert float(jnp.linalg.norm(_flat(out.grad))) > 1e-4
            h = 1e-5
            leaves, treedef = jax.tree.flatten(theta)
            for i in range(3):  # random directions u: <grad, u> against (L(θ + h u) - L(θ - h u)) / 2h
                ks = jax.random.split(jax.random.key(30 + i), len(leaves))
                u = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, jnp.float64)
                                                 for k, x in zip(ks, leaves, strict=True)])
                plus = mean_loss(jax.tree.map(lambda t, d: t + h * d, theta, u))
                minus = mean_loss(jax.tree.map(lambda t, d: t - h * d, theta, u))
                fd = float(plus - minus) / (2 * h)
                analytic = float(jnp.dot(_flat(out.grad), _flat(u)))
                assert abs(fd - analytic) <= 1e-7 + 1e-5 * abs(analytic), (i, fd, analytic)
                assert abs(analytic) > 1e-4

    def test_antithetic_es_agrees_in_direction_with_backprop(self, theta, states, tbptt_jit, meta_unroll):
        # One episode state copied n times: the ES mean then estimates the gradient of that one truncation loss
        # (with truncation (3, 3) and no episode ending, the unroll key changes nothing but the perturbation).
        n = 1024
        copies = jax.tree.map(lambda a: jnp.repeat(a[:1], n, axis=0), states)
        key = jax.random.key(40)
        backprop = tbptt_jit(theta, jax.tree.map(lambda a: a[:3], copies), key).grad  # (compiled for 3 tasks)
        es_fn = jax.jit(lambda th, s, k: mr.antithetic_es(meta_unroll, th, s, k, sigma=0.01))
        es = es_fn(theta, copies, key)
        es2 = es_fn(theta, copies, jax.random.key(41))
        # theory: cos ≈ (1 + (d + 1) / n)^(-1/2) for d = 333 parameters, about 0.87; two estimates, about 0.75
        assert _cosine(es.grad, backprop) > 0.7, _cosine(es.grad, backprop)
        assert _cosine(es2.grad, backprop) > 0.7
        assert _cosine(es.grad, es2.grad) > 0.5
        ratio = float(jnp.linalg.norm(_flat(es.grad)) / jnp.linalg.norm(_flat(backprop)))
        assert 0.8 < ratio < 1.5, ratio  # (the noise adds about sqrt(1 + d/n) to the norm)
