"""comm_sgd: communication schedules, step sizes, and local SGD against its exact equivalences.

Local SGD is checked on a small logistic regression: with H = 1 it is mini-batch SGD on the
workers' concatenated batches, one worker is plain SGD, vmap and shard_map agree bit for bit, and
an outer ``optax.sgd(1.0)`` is plain averaging.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import comm_sgd
import trainstep
from comm_sgd.schedules import VALID_FORMS
from comm_sgd.step_sizes import LR_FORMS, init_average, iterate_weight, update_average
from trainstep.runner import ConfigError

# ---------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize(
    "spec, num_steps, expected",
    [
        ("every", 5, [0, 1, 2, 3, 4]),
        ("fixed:3", 10, [2, 5, 8, 9]),  # ceil(10 / 3) = 4: the last step is always included
        ("fixed:3", 9, [2, 5, 8]),
        ("fixed:1", 4, [0, 1, 2, 3]),
        ("fixed:20", 7, [6]),
        ("post-local:2:3", 10, [0, 1, 4, 7, 9]),  # steps 1, 2 (warm-up), then 2+3, 2+6, last
        ("post-local:0:4", 8, [3, 7]),
        ("increasing:1", 10, [0, 2, 5, 9]),  # periods 1, 2, 3, 4 end at 1, 3, 6, 10
        ("increasing:2", 20, [1, 5, 11, 19]),  # periods 2, 4, 6, 8
        ("increasing:1.5", 12, [1, 4, 9, 11]),  # periods ceil(1.5)=2, 3, ceil(4.5)=5; then last
        ("increasing:1:2", 20, [0, 4, 13, 19]),  # periods 1, 4, 9 (p = 2); then last
        ("increasing:1:0.5", 10, [0, 2, 4, 6, 9]),  # periods 1, ceil(1.41)=2, ceil(1.73)=2, 2, 3
        ("once", 7, [6]),
        ("steps:3,5", 7, [2, 4, 6]),
        ("steps:5,3,3", 7, [2, 4, 6]),
        ("steps:3,20", 7, [2, 6]),
        ("steps:7", 7, [6]),
    ],
)
def test_schedule_masks_on_small_examples(spec, num_steps, expected):
    sched = comm_sgd.parse_schedule(spec)
    mask = sched.mask(num_steps)
    assert mask.dtype == bool and mask.shape == (num_steps,)
    np.testing.assert_array_equal(np.flatnonzero(mask), expected)
    assert sched.num_communications(num_steps) == len(expected)


@pytest.mark.parametrize("num_steps", [1, 7, 12, 30])
def test_schedule_counts_closed_forms(num_steps):
    assert comm_sgd.every().num_communications(num_steps) == num_steps
    assert comm_sgd.once().num_communications(num_steps) == 1
    for h in (1, 2, 3, 5, 8):
        assert comm_sgd.fixed(h).num_communications(num_steps) == math.ceil(num_steps / h)
    for w, h in ((0, 4), (3, 2), (5, 5)):
        w_eff = min(w, num_steps)
        expected = w_eff + math.ceil((num_steps - w_eff) / h)
        assert comm_sgd.post_local(w, h).num_communications(num_steps) == expected


@pytest.mark.parametrize("c", [0.5, 1.0, 2.0, 5.0])
def test_increasing_count_is_about_sqrt_2t_over_c(c):
    num_steps = 10_000
    count = comm_sgd.increasing(c).num_communications(num_steps)
    assert abs(count - math.sqrt(2 * num_steps / c)) <= 1.5
    # Periods grow: the gaps between communications are ceil(c * k), k = 1, 2, ...
    ends = np.flatnonzero(comm_sgd.increasing(c).mask(num_steps)) + 1
    gaps = np.diff(np.concatenate([[0], ends[:-1]]))
    np.testing.assert_array_equal(gaps, np.ceil(c * np.arange(1, len(gaps) + 1) - 1e-9))


def test_increasing_with_larger_p_communicates_less():
    counts = [comm_sgd.increasing(1.0, p).num_communications(2000) for p in (0.0, 0.5, 1.0, 2.0)]
    assert counts[0] == 2000  # p = 0: period ceil(1) = 1, every step
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 4


@pytest.mark.parametrize(
    "num_comms, num_steps, p",
    [(1, 50, 1.0), (5, 100, 1.0), (10, 1000, 1.0), (30, 1000, 1.0), (7, 50, 1.0), (20, 2000, 2.0), (12, 500, 0.5)],
)
def test_increasing_for_hits_the_requested_count(num_comms, num_steps, p):
    sched = comm_sgd.increasing_for(num_comms, num_steps, p=p)
    assert sched.kind == "increasing" and sched.p == p
    assert abs(sched.num_communications(num_steps) - num_comms) <= 1
    # Its spec reads back as the very same schedule (same mask, not just about the same count).
    back = comm_sgd.parse_schedule(sched.spec)
    assert back == sched
    np.testing.assert_array_equal(back.mask(num_steps), sched.mask(num_steps))


def test_increasing_for_rejects_zero_communications():
    with pytest.raises(comm_sgd.ScheduleError):
        comm_sgd.increasing_for(0, 100)


@pytest.mark.parametrize(
    "spec",
    ["every", "once", "fixed:4", "post-local:3:5", "post-local:0:2", "increasing:2", "increasing:1.5",
     "increasing:0.25:1.5", "increasing:3:0", "steps:2,5,9"],
)
def test_parse_schedule_round_trips_spec(spec):
    sched = comm_sgd.parse_schedule(spec)
    assert sched.spec == spec == str(sched)
    assert comm_sgd.parse_schedule(sched.spec) == sched
    assert comm_sgd.parse_schedule(sched) is sched


def test_parse_schedule_normalises_case_and_space_and_factories_agree():
    assert comm_sgd.parse_schedule(" Fixed:4 ") == comm_sgd.fixed(4)
    assert comm_sgd.parse_schedule("POST-LOCAL:2:3") == comm_sgd.post_local(2, 3)
    assert comm_sgd.parse_schedule("increasing:2:1") == comm_sgd.increasing(2.0)
    assert comm_sgd.parse_schedule("steps:9,2,5,2") == comm_sgd.at_steps([2, 5, 9])
    assert comm_sgd.at_steps([5, 3, 3]).steps == (3, 5)


@pytest.mark.parametrize(
    "spec",
    ["fixed", "fixed:0", "fixed:-2", "fixed:x", "fixed:2.5", "fixed:2:3", "increasing:-1", "increasing:0",
     "increasing:nan", "increasing:inf", "increasing:1:-1", "increasing:a", "foo", "", "every:3", "once:1",
     "post-local:1", "post-local:-1:2", "post-local:2:0", "steps:", "steps:0,3", "steps:a"],
)
def test_bad_schedule_specs_raise_config_error_listing_valid_forms(spec):
    with pytest.raises(comm_sgd.ScheduleError) as info:
        comm_sgd.parse_schedule(spec)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)
    for form in VALID_FORMS:
        assert form in str(info.value)


def test_bad_schedule_arguments():
    with pytest.raises(comm_sgd.ScheduleError):
        comm_sgd.parse_schedule(3)
    with pytest.raises(comm_sgd.ScheduleError):
        comm_sgd.SyncSchedule("sometimes")
    for bad in (0, -1, 2.0):
        with pytest.raises(comm_sgd.ScheduleError):
            comm_sgd.fixed(2).mask(bad)


# ---------------------------------------------------------------------------------------------
# Step sizes and the output iterate


def test_stich_and_polynomial_step_sizes():
    t = np.arange(6)
    np.testing.assert_allclose(comm_sgd.stich_step_size(0.5, 10.0)(t), 4.0 / (0.5 * (10.0 + t)), rtol=1e-6)
    poly = comm_sgd.polynomial_step_size(2.0, 0.6)
    np.testing.assert_allclose(poly(t), 2.0 * (t + 1.0) ** -0.6, rtol=1e-6)
    np.testing.assert_allclose(poly(0), 2.0)  # the first step is c
    np.testing.assert_allclose(comm_sgd.polynomial_step_size(0.3, 0.0)(t), np.full(6, 0.3), rtol=1e-6)
    assert comm_sgd.stich_shift(2.0, 5) == 33.0  # max(16 kappa, H) + 1
    assert comm_sgd.stich_shift(0.1, 5) == 6.0


def test_parse_step_size_forms():
    t = np.arange(5)
    np.testing.assert_allclose(comm_sgd.parse_step_size("stich", mu=0.5, a=10.0)(t), 4.0 / (0.5 * (10.0 + t)),
                               rtol=1e-6)
    np.testing.assert_allclose(comm_sgd.parse_step_size(" POLY:2:0.6 ", mu=1.0, a=1.0)(t), 2.0 * (t + 1.0) ** -0.6,
                               rtol=1e-6)
    const = comm_sgd.parse_step_size("const:0.3", mu=1.0, a=1.0)
    np.testing.assert_allclose([const(i) for i in t], np.full(5, 0.3), rtol=1e-6)


@pytest.mark.parametrize("spec", ["foo", "", "poly", "poly:1", "poly:1:0.5:2", "poly:x:0.5", "const", "const:x",
                                  "stich:1"])
def test_parse_step_size_malformed_lists_forms(spec):
    with pytest.raises(ConfigError) as info:
        comm_sgd.parse_step_size(spec, mu=1.0, a=1.0)
    for form in LR_FORMS:
        assert form in str(info.value)


@pytest.mark.parametrize("spec, mu, a", [("const:-1", 1.0, 1.0), ("const:0", 1.0, 1.0), ("const:nan", 1.0, 1.0),
                                         ("poly:1:2", 1.0, 1.0), ("poly:-1:0.5", 1.0, 1.0), ("stich", 0.0, 1.0),
                                         ("stich", 1.0, -1.0)])
def test_parse_step_size_bad_values(spec, mu, a):
    with pytest.raises(ConfigError):
        comm_sgd.parse_step_size(spec, mu=mu, a=a)


def _iterates(num=7, seed=0):
    rng = np.random.default_rng(seed)
    return [{"w": rng.normal(size=3).astype(np.float32), "b": np.float32(rng.normal())} for _ in range(num)]


@pytest.mark.parametrize("kind, shift", [("uniform", 1.0), ("stich", 1.0), ("stich", 5.0)])
def test_update_average_is_the_weighted_mean(kind, shift):
    xs = _iterates()
    t = np.arange(len(xs), dtype=np.float64)
    weights = np.ones_like(t) if kind == "uniform" else (shift + t) ** 2
    avg = init_average(jax.tree.map(jnp.asarray, xs[0]))
    for i, x in enumerate(xs):
        avg = update_average(avg, x, kind, jnp.int32(i), shift)
    expected = jax.tree.map(lambda *leaves: np.average(np.stack(leaves), axis=0, weights=weights), *xs)
    chex.assert_trees_all_close(avg.params, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(avg.weight, weights.sum(), rtol=1e-6)
    np.testing.assert_allclose(iterate_weight(kind, t, shift), weights, rtol=1e-6)


def test_update_average_last_keeps_the_last_iterate():
    xs = _iterates()
    avg = init_average(jax.tree.map(jnp.asarray, xs[0]))
    for i, x in enumerate(xs):
        avg = update_average(avg, x, "last", i)
    chex.assert_trees_all_equal(avg.params, xs[-1])
    assert float(avg.weight) == len(xs)
    with pytest.raises(ConfigError):
        iterate_weight("median", 0)


# ---------------------------------------------------------------------------------------------
# Local SGD on a small logistic regression

N, D, B = 64, 4, 4  # data points, features, per-worker batch
KEY = jax.random.key(42)


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    y = (x @ rng.normal(size=D) + 0.5 * rng.normal(size=N) > 0).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


X, Y = _data()
W0 = {"w": jnp.full((D,), 0.1, jnp.float32), "b": jnp.float32(-0.2)}
HP = {"lr": jnp.float32(0.5)}


def logistic_loss(params, batch, hparams, key):
    x, y = batch
    logits = x @ params["w"] + params["b"]
    return jnp.mean(jax.nn.softplus(logits) - y * logits), None


def noisy_logistic_loss(params, batch, hparams, key):
    """Uses the step key (feature noise), so that the workers' step keys are tested too."""
    x, y = batch
    return logistic_loss(params, (x + 0.1 * jax.random.normal(key, x.shape), y), hparams, key)


def sgd_step(loss=logistic_loss, momentum=None):
    return trainstep.gradient_step(loss, lambda h: optax.sgd(h["lr"], momentum=momentum))


def table_batch_fn(idx):
    """Worker ``w`` at step ``t`` gets the rows ``idx[t, w]``: deterministic, known to the test."""
    idx = jnp.asarray(idx)

    def batch_fn(key, t, worker):
        del key
        rows = idx[t, worker]
        return X[rows], Y[rows]

    return batch_fn


def iid_batch_fn(key, t, worker):
    rows = jax.random.randint(key, (B,), 0, N)
    return X[rows], Y[rows]


def _table(num_steps, num_workers, seed=1):
    return np.random.default_rng(seed).integers(0, N, size=(num_steps, num_workers, B))


def run_local(step, num_workers, schedule, num_steps, *, batch_fn, mesh=None, **options):
    """Builds the local SGD step, jits the whole unroll once and runs it from ``W0``."""
    ps = comm_sgd.parallel_local_sgd(step, num_workers=num_workers, worker_batch_fn=batch_fn, mesh=mesh, **options)
    mask = schedule if isinstance(schedule, np.ndarray) else comm_sgd.parse_schedule(schedule).mask(num_steps)
    run = jax.jit(lambda s, h: trainstep.unroll(ps, s, h, key=KEY, num_steps=num_steps,
                                                batch_fn=comm_sgd.schedule_batch_fn(mask)))
    return run(ps.init(step.init(W0, HP)), HP)


def worker_rows(tree, k):
    return jax.tree.map(lambda x: np.asarray(x)[k], tree)


def assert_workers_equal(tree):
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    for leaf in leaves:
        for k in range(1, leaf.shape[0]):
            np.testing.assert_array_equal(leaf[k], leaf[0])


def assert_workers_pairwise_differ(tree):
    flat = np.concatenate([np.asarray(x).reshape(np.shape(x)[0], -1) for x in jax.tree.leaves(tree)], axis=1)
    for i in range(flat.shape[0]):
        for j in range(i + 1, flat.shape[0]):
            assert not np.allclose(flat[i], flat[j], rtol=0, atol=1e-7), (i, j)


def test_every_step_averaging_equals_minibatch_sgd_on_the_concatenated_batches():
    """H = 1: K workers with batch b are mini-batch SGD with batch K*b, the workers' samples
    reconstructed from the documented key convention."""
    num_workers, num_steps = 4, 8
    state, metrics = run_local(sgd_step(), num_workers, "every", num_steps, batch_fn=iid_batch_fn)

    def sample(t, w):
        step_key = jax.random.fold_in(jax.random.fold_in(KEY, t), 1)  # trainstep.unroll's step key
        return jax.random.randint(jax.random.fold_in(jax.random.fold_in(step_key, w), 0), (B,), 0, N)

    ts, ws = np.meshgrid(np.arange(num_steps), np.arange(num_workers), indexing="ij")
    rows = np.asarray(jax.vmap(jax.vmap(sample))(ts, ws)).reshape(num_steps, num_workers * B)
    plain = sgd_step()
    ref, ref_metrics = jax.jit(lambda s, h: trainstep.unroll(plain, s, h, key=KEY, batches=(X[rows], Y[rows])))(
        plain.init(W0, HP), HP)

    chex.assert_shape(metrics["loss"], (num_steps, num_workers))
    for w in range(num_workers):
        chex.assert_trees_all_close(worker_rows(comm_sgd.worker_params(state), w), ref.params, rtol=1e-6, atol=1e-6)
    # The mean of the workers' losses is the loss of the concatenated batch (equal batch sizes).
    np.testing.assert_allclose(metrics["loss"].mean(axis=1), ref_metrics["loss"], rtol=1e-6, atol=1e-6)
    assert not np.allclose(ref.params["w"], W0["w"])


def test_one_worker_equals_plain_sgd_with_the_workers_step_key():
    """K = 1 is plain SGD whatever the schedule; its step key is fold_in(fold_in(k_t, 0), 1)."""
    num_steps = 7
    idx = _table(num_steps, 1)
    step = sgd_step(noisy_logistic_loss, momentum=0.9)
    state, metrics = run_local(step, 1, "fixed:3", num_steps, batch_fn=table_batch_fn(idx))

    def plain_with_worker_key(s, batch, h, key):
        return step.step(s, batch, h, jax.random.fold_in(jax.random.fold_in(key, 0), 1))

    rows = idx[:, 0]
    ref, ref_metrics = jax.jit(lambda s, h: trainstep.unroll(plain_with_worker_key, s, h, key=KEY,
                                                             batches=(X[rows], Y[rows])))(step.init(W0, HP), HP)
    chex.assert_trees_all_close(worker_rows(state.inner, 0), ref, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(metrics["loss"][:, 0], ref_metrics["loss"], rtol=1e-7, atol=1e-7)


SHARD_OPTIONS = {"opt_state": "average", "average": "uniform"}


def _momentum_run(num_workers, mesh):
    step = sgd_step(noisy_logistic_loss, momentum=0.9)
    return run_local(step, num_workers, "fixed:3", 10, batch_fn=iid_batch_fn, mesh=mesh, **SHARD_OPTIONS)


def test_vmap_equals_shard_map_bit_for_bit_with_one_worker_per_device():
    assert jax.device_count() == 8, "tests/conftest.py sets 8 CPU devices"
    sim = _momentum_run(8, None)
    real = _momentum_run(8, comm_sgd.worker_mesh(8))
    sim_leaves, sim_def = jax.tree.flatten(sim)
    real_leaves, real_def = jax.tree.flatten(real)
    assert sim_def == real_def
    for a, b in zip(sim_leaves, real_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state = real[0]
    assert state.inner.params["w"].sharding.spec[0] == "workers"  # really spread over the mesh
    np.testing.assert_array_equal(state.communications, np.full(8, comm_sgd.fixed(3).num_communications(10)))
    assert_workers_pairwise_differ(state.average.params)  # a non-trivial run: workers drift apart


def test_vmap_matches_shard_map_with_two_workers_per_device():
    sim = _momentum_run(16, None)
    real = _momentum_run(16, comm_sgd.worker_mesh(16))
    chex.assert_trees_all_close(jax.tree.map(np.asarray, real), jax.tree.map(np.asarray, sim), rtol=1e-5, atol=1e-6)
    # The two-stage average over devices and local workers still leaves all workers equal.
    assert_workers_equal(real[0].inner.params)
    assert_workers_equal(real[0].inner.opt_state)


@pytest.mark.parametrize("spec", ["post-local:2:3", "steps:4,5"])
def test_communication_count_matches_the_schedule(spec):
    num_steps, num_workers = 12, 2
    sched = comm_sgd.parse_schedule(spec)
    state, metrics = run_local(sgd_step(), num_workers, sched.spec, num_steps, batch_fn=iid_batch_fn)
    count = sched.num_communications(num_steps)
    np.testing.assert_array_equal(state.communications, np.full(num_workers, count))
    np.testing.assert_array_equal(state.t, np.full(num_workers, num_steps))
    chex.assert_shape(metrics["synced"], (num_steps, num_workers))
    np.testing.assert_array_equal(metrics["synced"].sum(axis=0), np.full(num_workers, count))
    np.testing.assert_array_equal(metrics["synced"][:, 0], sched.mask(num_steps).astype(np.int32))


def test_workers_draw_distinct_samples_and_once_averages_them():
    """Without any average the workers' iid samples (own keys) make them all differ; ``once``
    is the same run followed by one average."""
    num_steps, num_workers = 3, 4
    never, never_metrics = run_local(sgd_step(), num_workers, np.zeros(num_steps, bool), num_steps,
                                     batch_fn=iid_batch_fn)
    np.testing.assert_array_equal(never.communications, np.zeros(num_workers))
    assert int(never_metrics["synced"].sum()) == 0
    assert_workers_pairwise_differ(never.inner.params)

    once, _ = run_local(sgd_step(), num_workers, "once", num_steps, batch_fn=iid_batch_fn)
    np.testing.assert_array_equal(once.communications, np.ones(num_workers))
    assert_workers_equal(once.inner.params)
    chex.assert_trees_all_close(worker_rows(once.inner.params, 0),
                                jax.tree.map(lambda x: np.asarray(x).mean(axis=0), never.inner.params),
                                rtol=1e-6, atol=1e-7)


def test_outer_sgd_one_is_plain_averaging():
    num_steps, num_workers = 6, 4
    fn = table_batch_fn(_table(num_steps, num_workers))
    plain, _ = run_local(sgd_step(), num_workers, "fixed:3", num_steps, batch_fn=fn)
    outer, _ = run_local(sgd_step(), num_workers, "fixed:3", num_steps, batch_fn=fn, outer_optimizer=optax.sgd(1.0))
    chex.assert_trees_all_close(outer.inner.params, plain.inner.params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(outer.anchor, outer.inner.params)  # the anchor is the last average
    assert plain.anchor == () and plain.outer_state == ()


def test_outer_sgd_half_moves_halfway_from_the_anchor():
    """One round: the server step is ``anchor + 0.5 * (mean - anchor)`` with ``anchor = W0``."""
    num_steps, num_workers = 3, 4
    fn = table_batch_fn(_table(num_steps, num_workers))
    plain, _ = run_local(sgd_step(), num_workers, "once", num_steps, batch_fn=fn)
    half, _ = run_local(sgd_step(), num_workers, "once", num_steps, batch_fn=fn, outer_optimizer=optax.sgd(0.5))
    mean = worker_rows(plain.inner.params, 0)
    expected = jax.tree.map(lambda w0, m: np.asarray(w0) + 0.5 * (m - np.asarray(w0)), W0, mean)
    for w in range(num_workers):
        chex.assert_trees_all_close(worker_rows(half.inner.params, w), expected, rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_close(worker_rows(half.anchor, w), expected, rtol=1e-6, atol=1e-7)


def test_opt_state_average_vs_local_with_momentum():
    """After one averaging step, 'average' leaves every worker the mean of the momentum buffers
    that 'local' leaves each worker with (the runs agree up to that step)."""
    num_steps, num_workers = 2, 4
    fn = table_batch_fn(_table(num_steps, num_workers))
    step = sgd_step(momentum=0.9)
    avg, _ = run_local(step, num_workers, "once", num_steps, batch_fn=fn, opt_state="average")
    loc, _ = run_local(step, num_workers, "once", num_steps, batch_fn=fn, opt_state="local")
    assert_workers_equal(avg.inner.opt_state)
    assert_workers_pairwise_differ(loc.inner.opt_state)
    chex.assert_trees_all_close(worker_rows(avg.inner.opt_state, 0),
                                jax.tree.map(lambda x: np.asarray(x).mean(axis=0), loc.inner.opt_state),
                                rtol=1e-6, atol=1e-7)
    # Parameters are averaged either way.
    assert_workers_equal(avg.inner.params)
    chex.assert_trees_all_close(avg.inner.params, loc.inner.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(avg.inner.step, loc.inner.step)


@pytest.mark.parametrize("average, shift", [("uniform", 1.0), ("stich", 3.0), ("last", 1.0)])
def test_worker_output_is_the_weighted_mean_of_the_averaged_iterates(average, shift):
    """Records the mean of the workers' parameters after every step (as a metric of a wrapping
    step) and compares the output iterate with their weighted mean."""
    num_steps, num_workers = 6, 4
    step = sgd_step(momentum=0.5)
    ps = comm_sgd.parallel_local_sgd(step, num_workers=num_workers, worker_batch_fn=iid_batch_fn,
                                     average=average, average_shift=shift)

    def recording_step(states, batch, hparams, key):
        new, metrics = ps.step(states, batch, hparams, key)
        return new, dict(metrics, iterate=jax.tree.map(lambda x: jnp.mean(x, axis=0), new.inner.params))

    sched = comm_sgd.increasing(1.0)  # averages after steps 1, 3 and 6
    state, metrics = jax.jit(lambda s, h: trainstep.unroll(
        recording_step, s, h, key=KEY, num_steps=num_steps, batch_fn=comm_sgd.schedule_batch_fn(sched.mask(num_steps))
    ))(ps.init(step.init(W0, HP)), HP)

    t = np.arange(num_steps, dtype=np.float64)
    weights = {"uniform": np.ones(num_steps), "stich": (shift + t) ** 2, "last": np.eye(num_steps)[-1]}[average]
    expected = jax.tree.map(lambda x: np.average(np.asarray(x, np.float64), axis=0, weights=weights),
                            metrics["iterate"])
    output = comm_sgd.worker_output(state)
    chex.assert_trees_all_close(jax.tree.map(np.asarray, output), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(output["w"], metrics["iterate"]["w"][0])  # the iterates did move
    np.testing.assert_array_equal(state.communications, np.full(num_workers, sched.num_communications(num_steps)))


def test_bad_local_sgd_configurations_raise_config_error():
    step = sgd_step()
    with pytest.raises(ConfigError):
        comm_sgd.worker_mesh(12)
    with pytest.raises(ConfigError):
        comm_sgd.worker_mesh(0)
    with pytest.raises(ConfigError):
        comm_sgd.parallel_local_sgd(step, num_workers=12, worker_batch_fn=iid_batch_fn, mesh=comm_sgd.worker_mesh(8))
    with pytest.raises(ConfigError):
        comm_sgd.parallel_local_sgd(step, num_workers=8, worker_batch_fn=iid_batch_fn, mesh=comm_sgd.worker_mesh(8),
                                    axis_name="data")
    for bad in (0, -2, 2.0):
        with pytest.raises(ConfigError):
            comm_sgd.parallel_local_sgd(step, num_workers=bad, worker_batch_fn=iid_batch_fn)
    with pytest.raises(ConfigError):
        comm_sgd.local_sgd(step, opt_state="bogus")
    with pytest.raises(ConfigError):
        comm_sgd.local_sgd(step, average="bogus")
    with pytest.raises(ConfigError):
        comm_sgd.parallel_local_sgd(step, num_workers=2, worker_batch_fn=iid_batch_fn, average="bogus")
    with pytest.raises(TypeError):
        comm_sgd.local_sgd(step, outer_optimizer=lambda g: g)
    local = comm_sgd.local_sgd(step)
    with pytest.raises(TypeError, match="SyncBatch"):
        local.step(local.init(step.init(W0, HP)), (X[:B], Y[:B]), HP, KEY)
