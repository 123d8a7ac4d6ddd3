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


class TestMetaGradientFloat64:
    """Truncated backprop, its batching over tasks and antithetic ES, in float64 (one compiled program each)."""

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def x64(cls):
        with jax.enable_x64(True):
            yield

    @pytest.fixture(scope="class")
    @classmethod
    def setup(cls, x64):
        pool = sample_pool(jax.random.key(16), num=3)
        chex.assert_type(pool.x_unlabelled, jnp.float64)
        mu = mr.make_meta_unroll(pool_task_fn(pool), NUM_CLASSES, UNROLL_CONFIG, RULE_CONFIG)
        theta = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), common()[0])
        states = jax.jit(lambda k: mr.init_states(mu, k, 3))(jax.random.key(17))
        return dict(mu=mu, theta=theta, states=states,
                    tbptt=jax.jit(lambda th, s, k: mr.truncated_backprop(mu, th, s, k)),
                    vunroll=jax.jit(jax.vmap(mu.unroll, in_axes=(None, 0, 0))))

    def test_meta_gradient_matches_finite_differences(self, setup):
        theta, states = setup["theta"], setup["states"]
        key = jax.random.key(18)
        keys = jax.random.split(key, 3)  # truncated_backprop's per-task keys
        mean_loss = lambda th: jnp.mean(setup["vunroll"](th, states, keys)[1])  # noqa: E731
        out = setup["tbptt"](theta, states, key)
        chex.assert_trees_all_close(out.loss, mean_loss(theta), rtol=1e-12)
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
            assert abs(analytic) > 1e-4
            assert abs(fd - analytic) <= 1e-7 + 1e-5 * abs(analytic), (i, fd, analytic)

    def test_vmapped_tasks_equal_tasks_one_by_one(self, setup):
        theta, states, mu = setup["theta"], setup["states"], setup["mu"]
        keys = jax.random.split(jax.random.key(15), 3)
        batched = setup["vunroll"](theta, states, keys)
        one = jax.jit(mu.unroll)
        for i in range(3):
            single = one(theta, jax.tree.map(lambda a: a[i], states), keys[i])
            chex.assert_trees_all_close(_key_data(single), _key_data(jax.tree.map(lambda a: a[i], batched)),
                                        rtol=1e-10)
        # The estimator's mean gradient over three tasks equals the mean of each task's gradient, computed by the
        # same program on three copies of that task (with a fixed truncation and no episode ending, a task's
        # result does not depend on its key).
        key = jax.random.key(16)
        batch = setup["tbptt"](theta, states, key)
        per_task = [setup["tbptt"](theta, jax.tree.map(lambda a: jnp.repeat(a[i:i + 1], 3, axis=0), states), key)
                    for i in range(3)]
        chex.assert_trees_all_close(batch.loss, jnp.mean(jnp.stack([o.loss for o in per_task])), rtol=1e-10)
        chex.assert_trees_all_close(batch.grad, jax.tree.map(lambda *g: jnp.mean(jnp.stack(g), axis=0),
                                                             *[o.grad for o in per_task]), rtol=1e-8, atol=1e-12)
        for i, o in enumerate(per_task):
            chex.assert_trees_all_close(_key_data(jax.tree.map(lambda a: a[i], batch.states)),
                                        _key_data(jax.tree.map(lambda a: a[0], o.states)), rtol=1e-10)
        assert float(jnp.linalg.norm(_flat(batch.grad))) > 1e-4
        assert _cosine(per_task[0].grad, per_task[1].grad) < 0.999  # the tasks do differ

    def test_antithetic_es_agrees_in_direction_with_backprop(self, setup):
        # One episode state copied n times: the ES mean then estimates the gradient of that one truncation loss
        # (with truncation (3, 3) and no episode ending, the unroll key changes nothing but the perturbation).
        theta, states, mu = setup["theta"], setup["states"], setup["mu"]
        n = 1024
        copies = jax.tree.map(lambda a: jnp.repeat(a[:1], n, axis=0), states)
        backprop = setup["tbptt"](theta, jax.tree.map(lambda a: a[:3], copies), jax.random.key(40)).grad
        es_fn = jax.jit(lambda th, s, k: mr.antithetic_es(mu, th, s, k, sigma=0.01))
        es = es_fn(theta, copies, jax.random.key(41))
        es2 = es_fn(theta, copies, jax.random.key(42))
        # theory: cos ≈ (1 + (d + 1) / n)^(-1/2) for d = 333 parameters, about 0.87; between two estimates, 0.75
        assert _cosine(es.grad, backprop) > 0.7, _cosine(es.grad, backprop)
        assert _cosine(es2.grad, backprop) > 0.7, _cosine(es2.grad, backprop)
        assert _cosine(es.grad, es2.grad) > 0.5
        ratio = float(jnp.linalg.norm(_flat(es.grad)) / jnp.linalg.norm(_flat(backprop)))
        assert 0.8 < ratio < 1.5, ratio  # (the noise adds about sqrt(1 + d/n) to the norm)


# ---------------------------------------------------------------------------------------------
# PES on a toy whose full-horizon gradient is known

TOY_DECAY, TOY_INNER, TOY_TRUNCATIONS = 0.8, 2, 3
TOY_X0, TOY_TARGET, TOY_U = jnp.array([1.0, -0.5]), jnp.array([0.3, 0.7]), jnp.array([1.0, -1.0])
TOY_THETA = {"b": jnp.array([0.2, -0.1]), "c": jnp.array(0.3)}


def toy_unroll() -> mr.TruncatedUnroll:
    """``x ← 0.8 x + b + c u``, loss ``|x - target|²`` per inner step; episodes of 3 truncations of 2 steps.

    The episode's total loss is quadratic in θ, so PES's estimate is exactly unbiased for its gradient,
    whatever σ; a truncated estimate, which ignores how θ shaped the state a truncation starts from, is not.
    """
    def init(key):
        del key
        return {"x": TOY_X0, "t": jnp.zeros((), jnp.int32)}

    def unroll(theta, state, key):
        def body(x, _):
            x = TOY_DECAY * x + theta["b"] + theta["c"] * TOY_U
            return x, jnp.sum((x - TOY_TARGET) ** 2)

        x, losses = jax.lax.scan(body, state["x"], None, length=TOY_INNER)
        t = state["t"] + TOY_INNER
        done = t >= TOY_INNER * TOY_TRUNCATIONS
        new = jax.tree.map(lambda f, o: jnp.where(done, f, o), init(key), {"x": x, "t": t})
        return new, jnp.mean(losses), done

    return mr.TruncatedUnroll(init, unroll)


class TestPES:
    def test_pes_is_unbiased_where_truncated_estimates_are_not(self):
        toy, theta, m = toy_unroll(), TOY_THETA, 4096

        def full_horizon(th):
            state, total = toy.init(jax.random.key(0)), 0.0
            for i in range(TOY_TRUNCATIONS):
                state, loss, _ = toy.unroll(th, state, jax.random.key(i))
                total = total + loss
            return total

        truth = _flat(jax.grad(full_horizon)(theta))

        def episode(key, estimator):
            """Sum of an estimator's estimates over the truncations of one episode (one task)."""
            states = (mr.init_pes_states(toy, theta, key, 1) if estimator is mr.pes
                      else mr.init_states(toy, key, 1))
            total, dones = jnp.zeros(3), []
            for i in range(TOY_TRUNCATIONS):
                k = jax.random.fold_in(key, i)
                out = (mr.truncated_backprop(toy, theta, states, k) if estimator is mr.truncated_backprop
                       else estimator(toy, theta, states, k, sigma=0.1))
                states, total = out.states, total + _flat(out.grad)
                dones.append(out.done)
            return total, jnp.stack(dones), states

        def stats(estimator):
            totals, dones, states = jax.jit(jax.vmap(lambda k: episode(k, estimator)))(jax.random.split(
                jax.random.key(1), m))
            chex.assert_trees_all_equal(dones, jnp.tile(jnp.array([0.0, 0.0, 1.0]), (m, 1)))
            return jnp.mean(totals, axis=0), jnp.std(totals, axis=0) / np.sqrt(m), states

        pes_mean, pes_se, pes_states = stats(mr.pes)
        es_mean, es_se, _ = stats(mr.antithetic_es)
        truncated = stats(mr.truncated_backprop)[0]  # deterministic: every episode alike

        assert bool(jnp.all(jnp.abs(pes_mean - truth) < 4.5 * pes_se)), (pes_mean, truth, pes_se)
        assert bool(jnp.all(pes_se < 0.05 * jnp.abs(truth)))  # the test has power...
        assert float(jnp.max(jnp.abs(truncated - truth) / pes_se)) > 20  # ...and truncation is clearly biased
        assert bool(jnp.all(jnp.abs(es_mean - truncated) < 4.5 * es_se))  # ES estimates the truncated gradient
        # at the episode's end both particles restart from the same fresh state and the sum of ε is reset
        chex.assert_trees_all_equal(pes_states.pos, pes_states.neg)
        chex.assert_trees_all_equal(pes_states.accumulated, jax.tree.map(jnp.zeros_like, pes_states.accumulated))


# ---------------------------------------------------------------------------------------------
# The readout


class TestReadout:
    @pytest.mark.parametrize("shape", [(30, 6), (5, 12)], ids=["primal", "dual"])
    def test_ridge_fit_is_the_closed_form(self, shape):
        from sklearn.linear_model import Ridge

        rng = np.random.default_rng(0)
        x, y, l2 = rng.normal(size=shape), rng.normal(size=(shape[0], 3)), 0.3
        expected = np.linalg.solve(x.T @ x + l2 * np.eye(shape[1]), x.T @ y)
        with jax.enable_x64(True):
            got = np.asarray(mr.ridge_fit(jnp.asarray(x), jnp.asarray(y), l2))
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
        sk = Ridge(alpha=l2, fit_intercept=False, solver="cholesky").fit(x, y).coef_.T
        np.testing.assert_allclose(got, sk, rtol=1e-8, atol=1e-10)

    def test_few_shot_loss_against_numpy(self):
        rng = np.random.default_rng(1)
        fs, fq = rng.normal(size=(6, 4)), rng.normal(size=(9, 4))
        ys, yq = np.repeat(np.arange(3), 2), np.repeat(np.arange(3), 3)

        def design(f, centre):
            f = f - centre
            f = f / np.sqrt(np.sum(f ** 2, axis=1, keepdims=True) + 1e-6)
            return np.concatenate([f, np.ones((len(f), 1))], axis=1)

        centre = fs.mean(axis=0)
        xs = design(fs, centre)
        w = xs.T @ np.linalg.solve(xs @ xs.T + 0.1 * np.eye(6), np.eye(3)[ys])
        pred, target = design(fq, centre) @ w, np.eye(3)[yq]
        cosine = np.mean(1 - np.sum(pred * target, axis=1) / np.sqrt(np.sum(pred ** 2, axis=1) + 1e-6))
        mse = np.mean(np.sum((pred - target) ** 2, axis=1))
        acc = np.mean(np.argmax(pred, axis=1) == yq)
        with jax.enable_x64(True):
            for name, value in (("cosine", cosine), ("mse", mse)):
                loss, accuracy = mr.few_shot_ridge_loss(jnp.asarray(fs), jnp.asarray(ys), jnp.asarray(fq),
                                                        jnp.asarray(yq), 3, l2=0.1, loss=name)
                np.testing.assert_allclose(float(loss), value, rtol=1e-9)
                np.testing.assert_allclose(float(accuracy), acc)

    def test_separable_features_give_accuracy_one(self):
        rng = np.random.default_rng(2)
        ys, yq = np.repeat(np.arange(5), 2), np.repeat(np.arange(5), 20)
        feats = lambda y: 3.0 * np.eye(5)[y] + 0.05 * rng.normal(size=(len(y), 5))  # noqa: E731
        fs, fq = jnp.asarray(feats(ys), jnp.float32), jnp.asarray(feats(yq), jnp.float32)
        assert float(mr.few_shot_ridge_accuracy(fs, jnp.asarray(ys), fq, jnp.asarray(yq), 5)) == 1.0
        loss, _ = mr.few_shot_ridge_loss(fs, jnp.asarray(ys), fq, jnp.asarray(yq), 5)
        assert float(loss) < 0.05
        shuffled = jnp.asarray(rng.permutation(yq))  # labels unrelated to the features: near chance
        assert float(mr.few_shot_ridge_accuracy(fs, jnp.asarray(ys), fq, shuffled, 5)) < 0.5


# ---------------------------------------------------------------------------------------------
# θ files


class TestThetaFiles:
    def test_round_trip(self, tmp_path, theta):
        path = str(tmp_path / "sub" / "rule.npz")
        mr.save_theta(path, theta, RULE_CONFIG, metadata={"activation": "tanh", "loss": np.float32(0.25)})
        loaded, config, meta = mr.load_theta(path)
        chex.assert_trees_all_equal(loaded, theta)
        assert config == RULE_CONFIG
        assert meta == {"activation": "tanh", "loss": 0.25}

    def test_bad_files_raise_clear_errors(self, tmp_path, theta):
        with pytest.raises(DataError, match="no such file"):
            mr.load_theta(str(tmp_path / "missing.npz"))
        corrupt = tmp_path / "corrupt.npz"
        corrupt.write_bytes(b"PK\x03\x04 this is not a zip archive")
        with pytest.raises(DataError, match="corrupt.npz"):
            mr.load_theta(str(corrupt))

        good = str(tmp_path / "good.npz")
        mr.save_theta(good, theta, RULE_CONFIG)
        arrays = dict(np.load(good))

        def write(name, **changes):
            path = str(tmp_path / name)
            np.savez(path, **{**arrays, **changes})
            return path

        with pytest.raises(ConfigError, match="does not match"):
            mr.load_theta(write("shape.npz", **{"theta/in/w": np.zeros((12, 5), np.float32)}))
        with pytest.raises(DataError, match="NaN"):
            mr.load_theta(write("nan.npz", **{"theta/out/b": np.full_like(arrays["theta/out/b"], np.nan)}))
        missing = {k: v for k, v in arrays.items() if k != "theta/pool/w"}
        np.savez(str(tmp_path / "leaf.npz"), **missing)
        with pytest.raises(DataError, match="missing key 'theta/pool/w'"):
            mr.load_theta(str(tmp_path / "leaf.npz"))
        header = json.loads(str(arrays["config"]))
        with pytest.raises(DataError, match="header"):
            mr.load_theta(write("format.npz", config=np.asarray(json.dumps({**header, "format": "other/9"}))))
        with pytest.raises(DataError, match="header"):
            mr.load_theta(write("json.npz", config=np.asarray("{not json")))
        bigger = {**header, "rule_config": {**header["rule_config"], "hidden": 16}}  # θ of another rule's shape
        with pytest.raises(ConfigError, match="does not match"):
            mr.load_theta(write("config.npz", config=np.asarray(json.dumps(bigger))))
        with pytest.raises(ConfigError, match="does not match"):
            mr.save_theta(str(tmp_path / "x.npz"), theta, mr.RuleConfig(hidden=16))


# ---------------------------------------------------------------------------------------------
# Bad input


class TestBadInput:
    def test_configs(self):
        with pytest.raises(ConfigError, match="unknown activation 'sigmoid'"):
            mr.activation_fn("sigmoid")
        with pytest.raises(ConfigError, match="unknown activation"):
            mr.make_rule_step(RULE_CONFIG, activation="softplus")
        for bad in [(6,), (6, 0), (6, 2.5), (6, True), ()]:
            with pytest.raises(ConfigError, match="sizes"):
                mr.init_base_mlp(jax.random.key(0), bad)
        for kwargs, match in [({"hidden": 0}, "hidden"), ({"hidden": True}, "hidden"), ({"channels": 1.5}, "channels"),
                              ({"max_step": 0.0}, "max_step"), ({"max_step": float("nan")}, "max_step")]:
            with pytest.raises(ConfigError, match=f"RuleConfig.{match}"):
                mr.RuleConfig(**kwargs)
        for kwargs, match in [({"num_classes": 1}, "num_classes"), ({"shots": 0}, "shots"),
                              ({"queries": 2.0}, "queries"), ({"unlabelled": -1}, "unlabelled")]:
            with pytest.raises(ConfigError, match=f"TaskConfig.{match}"):
                mr.TaskConfig(**kwargs)
        for kwargs, match in [({"truncation": (5, 2)}, "truncation"), ({"truncation": (0, 3)}, "truncation"),
                              ({"length": (3,)}, "length"), ({"length": (2.0, 5)}, "length"),
                              ({"batch_size": 1}, "batch_size"), ({"readout_loss": "hinge"}, "readout loss"),
                              ({"readout_l2": 0.0}, "readout_l2"), ({"activation": "gelu"}, "activation"),
                              ({"sizes": (6,)}, "sizes")]:
            with pytest.raises(ConfigError, match=match):
                mr.UnrollConfig(**kwargs)
        with pytest.raises(ConfigError, match="must be a RuleConfig"):
            mr.make_rule_step({"hidden": 8})
        with pytest.raises(ConfigError, match="unknown readout loss"):
            mr.few_shot_ridge_loss(jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32), jnp.zeros((4, 2)),
                                   jnp.zeros(4, jnp.int32), 2, loss="hinge")
        with pytest.raises(ConfigError, match="learning_rate"):
            mr.meta_optimizer(0.0)

    def test_tasks_and_unrolls(self, pool):
        task_fn = pool_task_fn(pool)
        with pytest.raises(ConfigError, match="6 features but the base model's input size is 8"):
            mr.make_meta_unroll(task_fn, NUM_CLASSES, mr.UnrollConfig(sizes=(8, 4)), RULE_CONFIG)
        with pytest.raises(ConfigError, match="batch_size 32 exceeds the 24 unlabelled"):
            mr.make_meta_unroll(task_fn, NUM_CLASSES, mr.UnrollConfig(sizes=(DIM, 4), batch_size=32), RULE_CONFIG)
        with pytest.raises(ConfigError, match="num_classes"):
            mr.make_meta_unroll(task_fn, 1, UNROLL_CONFIG, RULE_CONFIG)
        with pytest.raises(ConfigError, match="must be an UnrollConfig"):
            mr.make_meta_unroll(task_fn, NUM_CLASSES, {"sizes": (DIM, 4)}, RULE_CONFIG)
        mu = mr.make_meta_unroll(task_fn, NUM_CLASSES, UNROLL_CONFIG, RULE_CONFIG)
        with pytest.raises(ConfigError, match="unknown estimator 'sgd'"):
            mr.make_estimator(mu, "sgd")
        with pytest.raises(ConfigError, match="sigma"):
            mr.make_estimator(mu, "es", sigma=0.0)
        with pytest.raises(ConfigError, match="TruncatedUnroll"):
            mr.make_estimator(task_fn, "tbptt")
        with pytest.raises(ConfigError, match="num_tasks"):
            mr.init_states(mu, jax.random.key(0), 0)
        x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
        y = np.repeat(np.arange(4), 10)
        with pytest.raises(ConfigError, match="needs unlabelled \\+ shots \\+ queries = 13"):
            mr.class_subset_task_fn(x, y, mr.TaskConfig(num_classes=3, shots=2, queries=3, unlabelled=8))
        with pytest.raises(ConfigError, match="fewer than TaskConfig.num_classes=5"):
            mr.class_subset_task_fn(x, y, mr.TaskConfig(num_classes=5, shots=1, queries=1, unlabelled=1))
        with pytest.raises(ConfigError, match="NaN"):
            mr.class_subset_task_fn(np.where(x > 2, np.nan, x), y, mr.TaskConfig(num_classes=2, shots=1, queries=1,
                                                                                 unlabelled=1))

    def test_rule_inputs(self, theta, task, params):
        rule = mr.make_rule_step(RULE_CONFIG)
        with pytest.raises(ConfigError, match="B >= 2"):
            rule.step(rule.init(params), task.x_unlabelled[:1], theta, jax.random.key(0))
        with pytest.raises(ConfigError, match="B >= 2"):
            rule.step(rule.init(params), task.x_unlabelled[0], theta, jax.random.key(0))
        with pytest.raises(ConfigError, match="do not chain|previous layer"):
            mr.with_backward_weights([(np.zeros((6, 4)), np.zeros(4)), (np.zeros((5, 3)), np.zeros(3))],
                                     jax.random.key(0))
        with pytest.raises(ConfigError, match="keys"):
            mr.check_params(({"w": np.zeros((6, 4)), "b": np.zeros(4)},))
        x = np.asarray(task.x_unlabelled)
        run = lambda **kw: mr.apply_rule(**{**dict(theta=theta, params=params, x=x, num_steps=1,  # noqa: E731
                                                   key=jax.random.key(0), config=RULE_CONFIG, batch_size=4), **kw})
        with pytest.raises(ConfigError, match="NaN"):
            run(x=np.where(x > 1.0, np.nan, x))
        with pytest.raises(ConfigError, match="5 features but the MLP's input size is 6"):
            run(x=x[:, :5])
        with pytest.raises(ConfigError, match="batch_size"):
            run(batch_size=1)
        with pytest.raises(ConfigError, match="num_steps"):
            run(num_steps=-1)
        with pytest.raises(ConfigError, match="does not match"):
            run(config=mr.RuleConfig(hidden=16))
        with pytest.raises(ConfigError, match="unknown activation"):
            run(activation="swish")
