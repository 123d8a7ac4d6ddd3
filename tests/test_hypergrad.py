"""Hypergradients through training against closed forms and finite differences."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trainstep import gradient_step, hypergradient, unroll, unrolled_validation_loss
from trainstep.data import make_ridge_problem, ridge_weights


def ridge_loss(w, batch, hparams, key):
    x, y = batch
    return jnp.mean((x @ w - y) ** 2) + hparams["lam"] * jnp.sum(w ** 2), None


def _ridge_setup(lr, n_train=40, d=10):
    p = make_ridge_problem(n_train=n_train, n_val=100, d=d, noise=0.5, seed=1)
    X, y, Xv, yv = (jnp.asarray(a, jnp.float64) for a in p)
    ts = gradient_step(ridge_loss, optax.sgd(lr))
    state = ts.init(jnp.zeros(d, jnp.float64))
    val_fn = lambda s: jnp.mean((Xv @ s.params - yv) ** 2)
    full_batch = lambda k, t: (X, y)
    return p, ts, state, val_fn, full_batch


def closed_form_gd_hypergradient(p, lam, lr, T):
    """d/d lam of the validation loss after T steps of full-batch GD from w = 0, by eigendecomposition."""
    n = len(p.y_train)
    s, Q = np.linalg.eigh(2 / n * p.X_train.T @ p.X_train)
    m = s + 2 * lam
    b = Q.T @ (2 / n * p.X_train.T @ p.y_train)
    r = 1 - lr * m
    c = (1 - r ** T) / m
    dc = 2 * (T * lr * r ** (T - 1) / m - (1 - r ** T) / m ** 2)
    w = Q @ (c * b)
    dw = Q @ (dc * b)
    resid = p.X_val @ w - p.y_val
    return float(np.mean(resid ** 2)), float(2 / len(p.y_val) * resid @ p.X_val @ dw)


@pytest.mark.parametrize("T", [2, 10, 100])
def test_ridge_gd_hypergradient_matches_closed_form(T):
    lr, lam = 0.05, 0.1
    with jax.enable_x64(True):
        p, ts, state, val_fn, full_batch = _ridge_setup(lr)
        loss, g = jax.jit(lambda h: hypergradient(ts, state, h, val_fn, key=jax.random.key(0),
                                                  num_steps=T, batch_fn=full_batch))({"lam": jnp.float64(lam)})
        want_loss, want_g = closed_form_gd_hypergradient(p, lam, lr, T)
        np.testing.assert_allclose(loss, want_loss, rtol=1e-10)
        np.testing.assert_allclose(g["lam"], want_g, rtol=1e-8)


def test_converged_hypergradient_matches_implicit_derivative():
    """After many GD steps the unrolled hypergradient approaches the implicit-function one."""
    lr, lam, T = 0.2, 0.05, 3000
    with jax.enable_x64(True):
        p, ts, state, val_fn, full_batch = _ridge_setup(lr)
        _, g = jax.jit(lambda h: hypergradient(ts, state, h, val_fn, key=jax.random.key(0), num_steps=T,
                                               batch_fn=full_batch, checkpoint=True))({"lam": jnp.float64(lam)})
    n, d = p.X_train.shape
    w = ridge_weights(p.X_train, p.y_train, lam)
    dw = -np.linalg.solve(p.X_train.T @ p.X_train / n + lam * np.eye(d), w)
    want = 2 / len(p.y_val) * (p.X_val @ w - p.y_val) @ p.X_val @ dw
    np.testing.assert_allclose(g["lam"], want, rtol=1e-6)


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, param_dtype=jnp.float64)(jnp.tanh(nn.Dense(8, param_dtype=jnp.float64)(x)))[:, 0]


def test_mlp_hypergradient_matches_finite_differences():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        X = jnp.asarray(rng.normal(size=(64, 4)))
        y = jnp.sin(X[:, 0]) + 0.1 * jnp.asarray(rng.normal(size=64))
        model = TinyMLP()

        def loss_fn(params, batch, h, key):
            x, t = batch
            l2 = sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))
            return jnp.mean((model.apply(params, x) - t) ** 2) + jnp.exp(h["log_l2"]) * l2, None

        ts = gradient_step(loss_fn, lambda h: optax.sgd(h["learning_rate"], momentum=0.9))
        params = model.init(jax.random.key(0), X[:1])
        idx = jax.random.randint(jax.random.key(1), (30, 16), 0, 64)
        batches = (X[idx], y[idx])
        val_fn = lambda s: jnp.mean((model.apply(s.params, X) - y) ** 2)
        h0 = {"learning_rate": jnp.float64(0.05), "log_l2": jnp.float64(-3.0)}

        def objective(h):
            return unrolled_validation_loss(ts, ts.init(params, h), h, val_fn, key=jax.random.key(2),
                                            batches=batches)[0]

        _, g = hypergradient(ts, ts.init(params, h0), h0, val_fn, key=jax.random.key(2), batches=batches)
        for name in h0:
            eps = 1e-6
            up = dict(h0, **{name: h0[name] + eps})
            down = dict(h0, **{name: h0[name] - eps})
            fd = (objective(up) - objective(down)) / (2 * eps)
            np.testing.assert_allclose(g[name], fd, rtol=1e-5, atol=1e-10)
            assert abs(float(g[name])) > 1e-6


def test_truncated_hypergradient_differentiates_only_the_last_steps():
    lr, lam, T, K = 0.05, 0.1, 30, 5
    with jax.enable_x64(True):
        p, ts, state, val_fn, full_batch = _ridge_setup(lr)
        h = {"lam": jnp.float64(lam)}
        key = jax.random.key(0)
        kw = dict(key=key, num_steps=T, batch_fn=full_batch)
        loss_full, g_full = hypergradient(ts, state, h, val_fn, **kw)
        loss_tr, g_tr = hypergradient(ts, state, h, val_fn, truncation=K, **kw)
        _, g_all = hypergradient(ts, state, h, val_fn, truncation=T, **kw)

        # Reference: the state after T-K steps is a constant, only the last K steps see h.
        mid, _ = unroll(ts, state, h, key=key, num_steps=T - K, batch_fn=full_batch)
        tail = lambda hh: val_fn(unroll(ts, mid, hh, key=key, num_steps=K, batch_fn=full_batch,
                                        step_offset=T - K)[0])
        eps = 1e-6
        fd = (tail({"lam": h["lam"] + eps}) - tail({"lam": h["lam"] - eps})) / (2 * eps)

    np.testing.assert_allclose(loss_tr, loss_full, rtol=1e-12)  # same forward value
    np.testing.assert_allclose(g_tr["lam"], fd, rtol=1e-6)
    chex.assert_trees_all_close(g_all, g_full, rtol=1e-10)
    assert abs(float(g_tr["lam"]) - float(g_full["lam"])) > 1e-3 * abs(float(g_full["lam"]))


def test_truncated_hypergradient_with_stacked_batches_and_checkpoint():
    lr, T, K = 0.05, 24, 8
    with jax.enable_x64(True):
        p, ts, state, val_fn, _ = _ridge_setup(lr)
        X, y = jnp.asarray(p.X_train), jnp.asarray(p.y_train)
        idx = jax.random.randint(jax.random.key(4), (T, 10), 0, len(y))
        batches = (X[idx], y[idx])
        h = {"lam": jnp.float64(0.1)}
        a = hypergradient(ts, state, h, val_fn, key=jax.random.key(0), batches=batches, truncation=K)
        b = hypergradient(ts, state, h, val_fn, key=jax.random.key(0), batches=batches, truncation=K,
                          checkpoint=True)
    chex.assert_trees_all_close(a, b, rtol=1e-10)
    with pytest.raises(ValueError, match="truncation must be >= 1"):
        hypergradient(ts, state, h, val_fn, key=jax.random.key(0), batches=batches, truncation=0)
