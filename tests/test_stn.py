"""Self-Tuning Networks: properties with a right answer.

Layers against flax's plain layers, hyperparameter transforms both ways, perturbation draws, the
entropy and its derivative, where gradients may and may not flow in the two alternating steps, the
STN hypergradient on ridge regression against the derivative of the exact ridge solution's
validation loss, Delta-STN's centring, declaration errors, and the regularisers.
"""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from stn_jax import (
    BestResponseConv,
    BestResponseDense,
    HParam,
    HParamError,
    HParamSpace,
    STNConfig,
    best_response_conv,
    best_response_dense,
    dropout,
    gaussian_noise,
    init_best_response_conv,
    init_best_response_dense,
    l2_penalty,
    make_stn,
    random_shift,
    response_mask,
    split_response,
)
from stn_jax.ridge import init_ridge_params, ridge_predict, squared_error, weight_decay_penalty
from trainstep.core import unroll
from trainstep.data import make_ridge_problem, ridge_optimal_lambda, ridge_validation_loss
from trainstep.runner import ConfigError

KEY = jax.random.key(0)


def _zero_response_kernel_and_bias(params):
    """Zeroes the response weights ``W_r, b_r`` but keeps the hyperparameter map ``V`` (non-zero)."""
    def leaf(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        is_resp = "response" in names or any(n.startswith("response_") for n in names)
        return jnp.zeros_like(x) if is_resp and not any("scale" in n for n in names) else x
    return jax.tree_util.tree_map_with_path(leaf, params)


# ---------------------------------------------------------------------------------------------
# Layers


def test_dense_with_zero_response_is_flax_dense():
    x = jax.random.normal(jax.random.key(1), (5, 7))
    h = jax.random.normal(jax.random.key(2), (5, 3))
    params = init_best_response_dense(KEY, 7, 4, 3, response_scale=1.0)
    params["general"]["bias"] = jax.random.normal(jax.random.key(3), (4,))
    params["response"]["bias"] = jax.random.normal(jax.random.key(4), (4,))
    no_map = jax.tree.map(lambda a: a, params)
    no_map["response"]["scale_kernel"] = jnp.zeros_like(params["response"]["scale_kernel"])
    no_map["response"]["scale_bias"] = jnp.zeros_like(params["response"]["scale_bias"])

    @jax.jit
    def outputs(params, no_map, x, h):
        return (nn.Dense(4).apply({"params": params["general"]}, x), best_response_dense(params, x, h),
                best_response_dense(_zero_response_kernel_and_bias(params), x, h),
                best_response_dense(no_map, x, h), best_response_dense(params, x, jnp.zeros_like(h)))

    plain, full, zero_response, zero_map, zero_h = outputs(params, no_map, x, h)
    assert not np.allclose(full, plain, atol=1e-3)  # the response matters
    for got in (zero_response, zero_map, zero_h):
        chex.assert_trees_all_close(got, plain, atol=1e-6)


def test_conv_with_zero_response_is_flax_conv():
    x = jax.random.normal(jax.random.key(1), (2, 6, 5, 3))
    h = jax.random.normal(jax.random.key(2), (2, 2))
    params = init_best_response_conv(KEY, 3, 4, (3, 3), 2, response_scale=1.0)
    params["general"]["bias"] = jax.random.normal(jax.random.key(3), (4,))
    @jax.jit
    def outputs(params, x, h):
        return (nn.Conv(4, (3, 3), padding="SAME").apply({"params": params["general"]}, x),
                best_response_conv(params, x, h), best_response_conv(_zero_response_kernel_and_bias(params), x, h),
                nn.Conv(4, (3, 3), padding="VALID").apply({"params": params["general"]}, x),
                best_response_conv(params, x, jnp.zeros_like(h), padding="VALID"))

    plain, full, zero_response, plain_valid, zero_h_valid = outputs(params, x, h)
    assert not np.allclose(full, plain, atol=1e-3)
    chex.assert_trees_all_close(zero_response, plain, atol=1e-5)
    chex.assert_trees_all_close(zero_h_valid, plain_valid, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_flax_modules_match_pure_functions_and_plain_layers(kind):
    if kind == "dense":
        x, h = jax.random.normal(jax.random.key(1), (3, 6)), jax.random.normal(jax.random.key(2), (3, 2))
        module, plain_module, pure = BestResponseDense(5), nn.Dense(5), best_response_dense
    else:
        x, h = jax.random.normal(jax.random.key(1), (3, 5, 5, 2)), jax.random.normal(jax.random.key(2), (3, 2))
        module, plain_module, pure = BestResponseConv(5, (3, 3)), nn.Conv(5, (3, 3), padding="SAME"), \
            best_response_conv
    variables = jax.jit(module.init)(KEY, x, h)
    flat = variables["params"]
    mask = response_mask(flat)
    assert {k for k, m in mask.items() if m} == {"response_kernel", "response_bias", "response_scale_kernel",
                                                   "response_scale_bias"}
    nested = {g: {k[len(g) + 1:]: v for k, v in flat.items() if k.startswith(g + "_")}
              for g in ("general", "response")}
    nested["response"]["bias"] = jnp.ones_like(nested["response"]["bias"])  # make every term count
    flat = {**flat, "response_bias": nested["response"]["bias"]}
    general, response = split_response({"params": flat})

    @jax.jit
    def outputs(flat, nested, general, x, h):
        return (module.apply({"params": flat}, x, h), pure(nested, x, h),
                plain_module.apply({"params": nested["general"]}, x),
                module.apply(_zero_response_kernel_and_bias({"params": flat}), x, h), module.apply(general, x, h))

    module_out, pure_out, plain, zeroed, general_only = outputs(flat, nested, general, x, h)
    chex.assert_trees_all_close(module_out, pure_out, atol=1e-5)
    chex.assert_trees_all_close(zeroed, plain, atol=1e-5)
    chex.assert_trees_all_close(general_only, plain, atol=1e-5)
    assert all(float(jnp.abs(v).max()) == 0 for k, v in response["params"].items() if k.startswith("general"))


# ---------------------------------------------------------------------------------------------
# Hyperparameters


ROUND_TRIPS = [
    (HParam("r", 0.5, low=0.1, high=0.9), [0.1 + 1e-3 * 0.8, 0.25, 0.5, 0.9 - 1e-3 * 0.8]),
    (HParam("neg", -2.0, low=-5.0, high=-1.0), [-4.99, -3.0, -1.01]),
    (HParam("p", 1.0, constraint="positive"), [1e-3, 0.5, 1.0, 50.0]),
    (HParam("l", 1.0, constraint="log"), [1e-5, 1e-2, 1.0, 1e3]),
    (HParam("x", 0.0, constraint="real"), [-3.0, 0.0, 2.5]),
]


@pytest.mark.parametrize("hp,values", ROUND_TRIPS, ids=[h.constraint + "-" + h.name for h, _ in ROUND_TRIPS])
def test_transforms_round_trip(hp, values):
    for v in values:
        u = hp.to_unconstrained(v)
        np.testing.assert_allclose(float(hp.constrain(jnp.float32(u))), v, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(hp.constrain(jnp.float32(hp.to_unconstrained(hp.init)))), hp.init, rtol=1e-6)
    if hp.constraint == "range":
        extreme = hp.constrain(jnp.asarray([-1e4, -50.0, 50.0, 1e4], jnp.float32))
        lo, hi = np.float32(hp.low), np.float32(hp.high)  # closed bounds, up to float32 rounding
        assert bool(jnp.all((extreme >= np.nextafter(lo, -np.inf)) & (extreme <= np.nextafter(hi, np.inf))))
        with pytest.raises(HParamError):
            hp.to_unconstrained(hp.high)
    if hp.constraint in ("positive", "log"):
        assert bool(jnp.all(hp.constrain(jnp.asarray([-30.0, 0.0, 30.0])) > 0))


def test_space_round_trip_and_discrete_rounding():
    space = HParamSpace([h for h, _ in ROUND_TRIPS] + [HParam("holes", 2.0, low=0.0, high=8.0, discrete=True)])
    values = {"r": 0.3, "neg": -1.5, "p": 2.0, "l": 1e-3, "x": -1.0, "holes": 2.6}
    got = space.values(space.unconstrained(values))
    assert got == pytest.approx(values, rel=1e-5)
    chex.assert_trees_all_close(space.constrain(space.init_unconstrained()),
                                {h.name: jnp.float32(h.init) for h in space.hparams}, rtol=1e-6)
    # Rounded where used, straight-through gradient: d round(v(u))/du = dv/du.
    i = space.index("holes")

    def holes(u, round_discrete):
        return space.constrain(u, round_discrete=round_discrete)["holes"]

    u = space.unconstrained(values)
    assert float(holes(u, True)) == 3.0
    np.testing.assert_allclose(jax.grad(holes)(u, True)[i], jax.grad(holes)(u, False)[i], rtol=1e-6)
    assert float(jax.grad(holes)(u, False)[i]) > 0


def test_per_example_draws_differ_and_per_batch_draws_are_shared():
    space = HParamSpace([HParam("rate", 0.3, low=0.0, high=0.9, perturb="example", init_scale=0.7),
                         HParam("weight_decay", 1e-3, constraint="log", perturb="batch", init_scale=0.2)])
    u, s = space.init_unconstrained(), space.init_scale_param()
    b = 4096
    draws = np.asarray(space.perturb(KEY, u, s, b))
    assert draws.shape == (b, 2)
    assert len(np.unique(draws[:, 0])) > 0.99 * b  # float32 draws may collide, rarely
    assert np.ptp(draws[:, 1]) == 0.0 and draws[0, 1] != float(u[1])
    eps = (draws[:, 0] - float(u[0])) / 0.7
    assert abs(eps.mean()) < 4 / math.sqrt(b) and abs(eps.std() - 1.0) < 0.05
    other = np.asarray(space.perturb(jax.random.key(1), u, s, b))
    assert other[0, 1] != draws[0, 1]
    many = jax.jit(jax.vmap(lambda k: space.perturb(k, u, s, 2)))(jax.random.split(KEY, 400))
    shared = (np.asarray(many)[:, 0, 1] - float(u[1])) / 0.2
    assert abs(shared.std() - 1.0) < 0.15  # the shared draw still has scale sigma


def test_entropy_value_and_gradient():
    s = jnp.asarray([-2.0, 0.0, 3.0], jnp.float32)
    sp = np.log1p(np.exp(np.asarray(s, np.float64)))
    want = np.sum(np.log(sp)) + 1.5 * math.log(2 * math.pi * math.e)
    np.testing.assert_allclose(float(HParamSpace.entropy(s)), want, rtol=1e-6)
    sigmoid = 1.0 / (1.0 + np.exp(-np.asarray(s, np.float64)))
    np.testing.assert_allclose(jax.grad(HParamSpace.entropy)(s), sigmoid / sp, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="a", init=0.5, low=1.0, high=1.0), "low < high"),
    (dict(name="a", init=0.5, low=2.0, high=1.0), "low < high"),
    (dict(name="a", init=0.0, low=0.0, high=1.0), "outside"),
    (dict(name="a", init=1.5, low=0.0, high=1.0), "outside"),
    (dict(name="a", init=0.5, constraint="sigmoid"), "unknown constraint"),
    (dict(name="a", init=0.5), "needs low and high"),
    (dict(name="a", init=-1.0, constraint="log"), "init > 0"),
    (dict(name="a", init=0.5, low=0.0, high=1.0, perturb="layer"), "perturb"),
])
def test_bad_declarations_raise(kwargs, match):
    with pytest.raises(HParamError, match=match) as info:
        HParam(**kwargs)
    assert isinstance(info.value, ConfigError)  # so the CLI exits with code 2
    assert "'a'" in str(info.value)


def test_duplicate_names_raise():
    with pytest.raises(HParamError, match="duplicate") as info:
        HParamSpace([HParam("wd", 1.0, constraint="log"), HParam("wd", 0.5, low=0.0, high=1.0)])
    assert isinstance(info.value, ConfigError)
    with pytest.raises(HParamError):
        HParamSpace([])


# ---------------------------------------------------------------------------------------------
# The alternating steps: where gradients flow

MLP_SPACE = HParamSpace([HParam("dropout", 0.3, low=0.0, high=0.9),
                         HParam("weight_decay", 1e-2, constraint="log", perturb="batch")])


def mlp_predict(params, x, h, hvals, key, train):
    if train:
        x = dropout(key, x, hvals["dropout"])
    z = jax.nn.relu(best_response_dense(params["l1"], x, h))
    return best_response_dense(params["l2"], z, h)[:, 0]


def mlp_penalty(params, h, hvals):
    return l2_penalty(params, jnp.mean(hvals["weight_decay"]))


def _mlp(delta=False, linearize=False, tune_scales=True, hyper_optimizer=None):
    stn = make_stn(MLP_SPACE, mlp_predict, squared_error, penalty=mlp_penalty,
                   weight_optimizer=optax.sgd(0.1), hyper_optimizer=hyper_optimizer or optax.adam(0.1),
                   config=STNConfig(delta=delta, linearize=linearize, tune_scales=tune_scales))
    k1, k2 = jax.random.split(KEY)
    params = {"l1": init_best_response_dense(k1, 4, 8, 2, response_scale=1.0),
              "l2": init_best_response_dense(k2, 8, 1, 2, response_scale=1.0)}
    x = jax.random.normal(jax.random.key(5), (16, 4))
    y = jnp.sin(x[:, 0]) + x[:, 1]
    return stn, stn.init(params), (x, y)


MODES = [dict(), dict(delta=True), dict(delta=True, linearize=True)]
MODE_IDS = ["stn", "delta", "delta-linearized"]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_weight_step_gives_no_gradient_to_hyperparameters(mode):
    stn, state, batch = _mlp(**mode)

    def outputs(hyper_params):
        s = state._replace(hyper=state.hyper._replace(params=hyper_params))
        out, m = stn.weight_step.step(s, batch, None, KEY)
        return m["loss"], sum(jnp.sum(p) for p in jax.tree.leaves(out.weights.params))

    @jax.jit
    def run(hyper_params):
        new, _ = stn.weight_step.step(state, batch, None, KEY)
        grads = [jax.grad(lambda hp: outputs(hp)[i])(hyper_params) for i in range(2)]
        moved = outputs({"u": hyper_params["u"] + 1.0, "s": hyper_params["s"]})[0]
        return new, grads, outputs(hyper_params)[0], moved

    new, grads, loss_a, loss_b = run(state.hyper.params)
    chex.assert_trees_all_equal(new.hyper, state.hyper)
    for group in ("general", "response"):  # both weight groups move
        assert not np.allclose(new.weights.params["l1"][group]["kernel"], state.weights.params["l1"][group]["kernel"])
    for g in grads:  # neither the loss nor the updated weights carry gradient to (u, s)
        chex.assert_trees_all_equal(g, jax.tree.map(jnp.zeros_like, g))
    # ...although the loss does depend on the hyperparameters (through the perturbed regularisers).
    assert float(loss_a) != float(loss_b)


@pytest.mark.parametrize("mode", MODES[:2], ids=MODE_IDS[:2])
def test_hyper_step_changes_only_hyperparameters_through_the_response(mode):
    stn, state, batch = _mlp(**mode, hyper_optimizer=optax.sgd(1.0))
    hyper_step = jax.jit(stn.hyper_step.step)
    new, metrics = hyper_step(state, batch, None, KEY)
    chex.assert_trees_all_equal(new.weights, state.weights)
    assert not np.allclose(new.hyper.params["u"], state.hyper.params["u"])
    assert not np.allclose(new.hyper.params["s"], state.hyper.params["s"])
    # Without response weights (W_r = b_r = 0; the map V stays) the validation loss does not depend on u.
    flat = state._replace(weights=state.weights._replace(
        params=_zero_response_kernel_and_bias(state.weights.params)))
    new_flat, _ = hyper_step(flat, batch, None, KEY)
    chex.assert_trees_all_equal(new_flat.hyper.params["u"], flat.hyper.params["u"])
    assert not np.allclose(new_flat.hyper.params["s"], flat.hyper.params["s"])  # the entropy still acts on s
    # With tune_scales off, sigma stays at its declared value.
    stn_fixed, state_fixed, _ = _mlp(**mode, tune_scales=False, hyper_optimizer=optax.sgd(1.0))
    new_fixed, _ = jax.jit(stn_fixed.hyper_step.step)(state_fixed, batch, None, KEY)
    chex.assert_trees_all_equal(new_fixed.hyper.params["s"], state_fixed.hyper.params["s"])


def test_delta_stn_response_vanishes_at_the_centre():
    stn, state, batch = _mlp(delta=True)
    x = batch[0]
    state = state._replace(hyper=state.hyper._replace(
        params={"u": jnp.asarray([1.5, -2.0]), "s": state.hyper.params["s"]}))
    general = state.weights.params

    def plain_mlp(x):
        z = jax.nn.relu(nn.Dense(8).apply({"params": general["l1"]["general"]}, x))
        return nn.Dense(1).apply({"params": general["l2"]["general"]}, z)[:, 0]

    stn_plain, _, _ = _mlp()
    delta_out, plain_out, stn_out = jax.jit(lambda s, x: (stn.predict_at(s, x), plain_mlp(x),
                                                          stn_plain.predict_at(s, x)))(state, x)
    chex.assert_trees_all_close(delta_out, plain_out, atol=1e-5)
    # Plain STN feeds the hyperparameters themselves: the response is on.
    assert not np.allclose(stn_out, plain_out, atol=1e-3)


def test_linearized_delta_stn_is_exact_for_a_response_linear_in_h():
    """Ridge's best response ``w_g + (h.v) w_r`` is affine in ``h``: linearising changes nothing."""
    p = make_ridge_problem(n_train=20, n_val=10, d=6, seed=3)
    x, y = jnp.asarray(p.X_train, jnp.float32), jnp.asarray(p.y_train, jnp.float32)
    space = HParamSpace([HParam("weight_decay", 0.1, constraint="log", perturb="batch")])
    params = {"general": {"w": jnp.linspace(-1, 1, 6)}, "response": {"w": jnp.linspace(1, 0, 6), "v": jnp.ones(1)}}
    states = []
    for linearize in (False, True):
        stn = make_stn(space, ridge_predict, squared_error, penalty=weight_decay_penalty,
                       weight_optimizer=optax.sgd(0.1), hyper_optimizer=optax.adam(0.1),
                       config=STNConfig(delta=True, linearize=linearize))
        states.append(jax.jit(stn.weight_step.step)(stn.init(params), (x, y), None, KEY)[0])
    chex.assert_trees_all_close(states[0].weights.params, states[1].weights.params, atol=1e-6)
    assert not np.allclose(states[0].weights.params["response"]["w"], params["response"]["w"])


# ---------------------------------------------------------------------------------------------
# The STN hypergradient on ridge against the closed form

RIDGE = make_ridge_problem(seed=0)
LAM_STAR, _ = ridge_optimal_lambda(RIDGE)
SIGN_RATIOS = (0.1, 1 / 3, 3.0, 10.0)  # lam / lam*, away from the optimum: the sign
SIZE_RATIOS = (0.5, 2.0)  # near the optimum, where the derivative is still well away from 0: the size
# Measured on this problem (2,000 Adam steps at 1e-2, sigma 0.1 to 0.5, STN and Delta-STN): the
# relative error is <= 4 % at lam*/2 and 2 lam*; up to 17 % far away (lam*/10, 10 lam*), where
# a linear response over +-sigma in log lam fits a curved best response less well.
SIZE_RTOL = 0.10


def closed_form_log_derivative(lam: float, delta: float = 1e-4) -> float:
    """d val(lam) / d log(lam) for the exact ridge solution, by central differences."""
    return (ridge_validation_loss(RIDGE, lam * math.exp(delta))
            - ridge_validation_loss(RIDGE, lam * math.exp(-delta))) / (2 * delta)


@pytest.mark.parametrize("delta", [False, True], ids=["stn", "delta-stn"])
def test_ridge_stn_hypergradient_matches_closed_form_derivative(delta):
    x, y, xv, yv = (jnp.asarray(a, jnp.float32) for a in RIDGE)
    space = HParamSpace([HParam("weight_decay", 1.0, constraint="log", perturb="batch", init_scale=0.5)])
    # Hyper optimiser SGD(1) without perturbation: one hyper step moves u by minus the hypergradient.
    stn = make_stn(space, ridge_predict, squared_error, penalty=weight_decay_penalty,
                   weight_optimizer=optax.adam(1e-2), hyper_optimizer=optax.sgd(1.0),
                   config=STNConfig(delta=delta, tune_scales=False))

    def hypergradient_at(log_lam):
        s0 = stn.init(init_ridge_params(x.shape[1]))
        s0 = s0._replace(hyper=s0.hyper._replace(params={"u": log_lam[None], "s": s0.hyper.params["s"]}))
        # Train the weights (and so the response) at fixed lam: hyper steps never run here.
        s1, _ = unroll(stn.weight_step, s0, None, key=KEY, num_steps=2000, batch_fn=lambda k, t: (x, y))
        s2, _ = stn.hyper_step.step(s1, (xv, yv), None, KEY)
        return s1.hyper.params["u"][0] - s2.hyper.params["u"][0]

    ratios = SIGN_RATIOS + SIZE_RATIOS
    lams = jnp.log(jnp.asarray([LAM_STAR * r for r in ratios], jnp.float32))
    got = np.asarray(jax.jit(jax.vmap(hypergradient_at))(lams))
    want = np.asarray([closed_form_log_derivative(LAM_STAR * r) for r in ratios])
    assert np.all(np.sign(got) == np.sign(want)), (got, want)
    near = slice(len(SIGN_RATIOS), None)
    np.testing.assert_allclose(got[near], want[near], rtol=SIZE_RTOL)


# ---------------------------------------------------------------------------------------------
# Regularisers


def test_dropout_keeps_one_minus_rate_per_example_capped():
    rates = jnp.asarray([0.0, 0.3, 0.6, 0.95, 1.0])
    x = jnp.ones((5, 40000))
    out = np.asarray(jax.jit(dropout)(KEY, x, rates))
    kept = (out != 0).mean(axis=1)
    want = 1.0 - np.minimum(np.asarray(rates), 0.9)
    np.testing.assert_allclose(kept, want, atol=0.01)
    np.testing.assert_allclose(out.mean(axis=1), 1.0, atol=0.03)  # inverted dropout keeps the mean
    np.testing.assert_allclose(out[out != 0], np.repeat(1.0 / want, (out != 0).sum(axis=1)), rtol=1e-6)
    # The mask carries no gradient to the rate.
    g = jax.jit(jax.grad(lambda r: jnp.sum(dropout(KEY, x[:, :10], r))))(rates)
    chex.assert_trees_all_equal(g, jnp.zeros_like(rates))


def test_random_shift_with_zero_magnitude_is_identity_and_shifts_otherwise():
    x = jax.random.normal(KEY, (6, 40))
    shift = jax.jit(random_shift)
    chex.assert_trees_all_equal(shift(jax.random.key(1), x, jnp.zeros(6)), x)
    chex.assert_trees_all_equal(shift(jax.random.key(1), x, jnp.float32(0.0)), x)
    shifted = shift(jax.random.key(1), x, jnp.full((6,), 0.5))
    assert not np.allclose(shifted, x)
    # A circular shift keeps each signal's mean.
    np.testing.assert_allclose(shifted.mean(axis=1), x.mean(axis=1), atol=1e-5)


def test_gaussian_noise_has_the_per_example_scale():
    std = jnp.asarray([0.0, 0.5, 2.0])
    x = jnp.ones((3, 20000))
    noise = np.asarray(jax.jit(gaussian_noise)(KEY, x, std)) - 1.0
    np.testing.assert_allclose(noise.std(axis=1), np.asarray(std), rtol=0.03, atol=1e-7)
