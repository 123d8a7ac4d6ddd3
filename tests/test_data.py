"""Tests of trainstep.data: offline datasets, synthetic optima, minibatches, validated .npz files."""

from __future__ import annotations

import collections
import random

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import scipy.special

from trainstep import data as D
from trainstep.data import DataError


def _row_counter(x, y=None):
    """Multiset of the rows of ``x`` (with their labels), for split bookkeeping independent of order."""
    x = np.ascontiguousarray(x)
    if y is None:
        return collections.Counter(r.tobytes() for r in x)
    return collections.Counter((r.tobytes(), int(label)) for r, label in zip(x, y, strict=True))


# ---------------------------------------------------------------------------------------------
# MNIST-1D


@pytest.fixture(scope="module")
def mnist1d_full():
    return D.load_mnist1d(val_fraction=0.0)


def test_mnist1d_shapes_and_split(mnist1d_full):
    d = D.load_mnist1d(val_fraction=0.1)
    assert d.num_features == 40 and d.num_classes == 10
    assert len(d.y_train) + len(d.y_val) == 4000
    assert len(d.y_test) == 1000
    chex.assert_shape([d.x_train], (len(d.y_train), 40))
    chex.assert_shape([d.x_val], (len(d.y_val), 40))
    chex.assert_shape([d.x_test], (1000, 40))
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert set(np.unique(d.y_test)) == set(range(10))
    assert d.summary() == {"name": "mnist1d", "num_features": 40, "num_classes": 10,
                           "n_train": len(d.y_train), "n_val": len(d.y_val), "n_test": 1000}

    # Train and validation partition the standard training split: their union (as a multiset of
    # (row, label) pairs) is exactly the 4,000 examples, so they are disjoint.
    full = mnist1d_full
    assert _row_counter(d.x_train, d.y_train) + _row_counter(d.x_val, d.y_val) == _row_counter(
        full.x_train, full.y_train)
    assert not set(_row_counter(d.x_train)) & set(_row_counter(d.x_val))
    # The test split is the standard one, untouched by the validation carving.
    np.testing.assert_array_equal(d.x_test, full.x_test)
    np.testing.assert_array_equal(d.y_test, full.y_test)

    # Stratified: each class's validation count is round(0.1 * class count).
    full_counts = np.bincount(full.y_train, minlength=10)
    val_counts = np.bincount(d.y_val, minlength=10)
    np.testing.assert_array_equal(val_counts, np.round(0.1 * full_counts).astype(int))


def test_mnist1d_val_fraction_zero_keeps_all_training(mnist1d_full):
    d = mnist1d_full
    assert len(d.y_train) == 4000 and len(d.y_val) == 0 and len(d.y_test) == 1000
    chex.assert_shape([d.x_val], (0, 40))
    assert set(np.unique(d.y_train)) == set(range(10))


def test_mnist1d_deterministic_and_global_rng_untouched():
    # A small non-default dataset (fast), generated through the uncached function so that the
    # generator (which seeds numpy's and random's global RNGs) surely runs.
    np.random.seed(1234)
    random.seed(99)
    np_before, py_before = np.random.get_state(), random.getstate()
    fresh = D._mnist1d_arrays.__wrapped__(500, 7)
    np_after, py_after = np.random.get_state(), random.getstate()
    assert np_before[0] == np_after[0]
    np.testing.assert_array_equal(np_before[1], np_after[1])
    assert np_before[2:] == np_after[2:]
    assert py_before == py_after
    assert np.random.random() == np.random.RandomState(1234).random()  # the sequence goes on as seeded

    # Generated twice from scratch: identical.
    d = D.load_mnist1d(val_fraction=0.0, num_samples=500, data_seed=7)
    for a, b in zip((d.x_train, d.y_train, d.x_test, d.y_test), fresh, strict=True):
        np.testing.assert_array_equal(a, b)
    chex.assert_shape([d.x_train, d.x_test], [(400, 40), (100, 40)])
    other = D._mnist1d_arrays.__wrapped__(500, 8)  # the data seed matters
    assert not np.array_equal(other[0], fresh[0])


def test_mnist1d_validation_carving_deterministic():
    a, b, c = (D.load_mnist1d(0.1, split_seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a.x_val, b.x_val)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.x_val, c.x_val)


def test_mnist1d_returned_arrays_do_not_alias_the_cache():
    d = D.load_mnist1d(val_fraction=0.0)
    keep_train, keep_test = d.x_train.copy(), d.x_test.copy()
    d.x_train[:] = 123.0  # a caller normalising in place
    d.x_test[:] = 0.0
    d2 = D.load_mnist1d(val_fraction=0.0)
    np.testing.assert_array_equal(d2.x_train, keep_train)
    np.testing.assert_array_equal(d2.x_test, keep_test)


def test_mnist1d_bad_val_fraction():
    with pytest.raises(DataError, match="val_fraction"):
        D.load_mnist1d(val_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# digits


def test_digits():
    from sklearn.datasets import load_digits as sk_digits

    d = D.load_digits()
    assert d.num_features == 64 and d.num_classes == 10
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 1797
    for x in (d.x_train, d.x_val, d.x_test):
        assert x.dtype == np.float32 and x.shape[1] == 64
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert d.x_train.max() == 1.0  # scaled by 16, not by the data's own max
    # Every example lands in exactly one split (multiset equality with the original data).
    sk = sk_digits()
    want = _row_counter((sk.data / 16.0).astype(np.float32), sk.target)
    got = (_row_counter(d.x_train, d.y_train) + _row_counter(d.x_val, d.y_val)
           + _row_counter(d.x_test, d.y_test))
    assert got == want
    assert len(d.y_test) == pytest.approx(0.2 * 1797, abs=10)
    assert len(d.y_val) == pytest.approx(0.1 * 1797, abs=10)
    # Deterministic.
    d2 = D.load_digits()
    np.testing.assert_array_equal(d.x_test, d2.x_test)
    np.testing.assert_array_equal(d.y_train, d2.y_train)


# ---------------------------------------------------------------------------------------------
# Synthetic problems


def _np_logistic_grad(w, X, y, l2):
    s = scipy.special.expit(-y * (X @ w))
    return -(X.T @ (y * s)) / len(y) + l2 * w


@pytest.mark.parametrize("n,d,scale,l2", [(200, 5, 1.0, 1e-2), (300, 20, 3.0, 1e-3)])
def test_logistic_optimum(n, d, scale, l2):
    prob = D.make_logistic_problem(n, d, scale, l2=l2, seed=1)
    assert set(np.unique(prob.y)) == {-1.0, 1.0}
    chex.assert_shape([prob.X, prob.y], [(n, d), (n,)])
    assert prob.l2 == l2

    w, f = D.logistic_optimum(prob.X, prob.y, prob.l2)
    assert np.linalg.norm(_np_logistic_grad(w, prob.X, prob.y, prob.l2)) < 1e-8
    # The reported value is the loss at w (independent numpy formula).
    f_np = np.mean(np.log1p(np.exp(-prob.y * (prob.X @ w)))) + 0.5 * l2 * w @ w
    assert f == pytest.approx(f_np, rel=1e-12)

    res = scipy.optimize.minimize(
        lambda v: D.logistic_loss(v, prob.X, prob.y, prob.l2), np.zeros(d),
        jac=lambda v: _np_logistic_grad(v, prob.X, prob.y, prob.l2), method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000})
    assert f <= res.fun + 1e-15  # Newton's optimum is no worse than L-BFGS
    assert f == pytest.approx(res.fun, rel=1e-8)
    np.testing.assert_allclose(w, res.x, atol=1e-4)


def test_logistic_optimum_needs_l2():
    prob = D.make_logistic_problem(50, 3)
    with pytest.raises(ValueError, match="l2 > 0"):
        D.logistic_optimum(prob.X, prob.y, 0.0)


@pytest.mark.parametrize("lam", [1e-4, 0.1, 3.0])
def test_ridge_weights_match_augmented_lstsq(lam):
    p = D.make_ridge_problem(seed=2)
    X, y = p.X_train, p.y_train
    n, d = X.shape
    # mean((Xw - y)^2) + lam |w|^2 = |[X; sqrt(n lam) I] w - [y; 0]|^2 / n
    A = np.vstack([X, np.sqrt(n * lam) * np.eye(d)])
    b = np.concatenate([y, np.zeros(d)])
    w_ref = np.linalg.lstsq(A, b, rcond=None)[0]
    np.testing.assert_allclose(D.ridge_weights(X, y, lam), w_ref, rtol=1e-8, atol=1e-10)
    assert D.ridge_validation_loss(p, lam) == pytest.approx(np.mean((p.X_val @ w_ref - p.y_val) ** 2), rel=1e-10)


def test_ridge_optimal_lambda_is_a_minimum():
    p = D.make_ridge_problem(seed=0)
    lam, v = D.ridge_optimal_lambda(p)
    assert 1e-6 < lam < 1e3  # interior: weight decay helps on this problem
    assert v == pytest.approx(D.ridge_validation_loss(p, lam), rel=1e-12)
    tol = 1e-12 * abs(v)
    assert D.ridge_validation_loss(p, lam * 1.05) >= v - tol
    assert D.ridge_validation_loss(p, lam / 1.05) >= v - tol
    # Better than the grid's endpoints (no weight decay / huge weight decay).
    assert v < D.ridge_validation_loss(p, 1e-6) and v < D.ridge_validation_loss(p, 1e3)


# ---------------------------------------------------------------------------------------------
# Minibatches


def test_minibatch_epoch_mode_covers_each_index_at_most_once():
    n, b = 23, 5
    per_epoch = n // b
    batch_fn = D.minibatch_fn((np.arange(n),), b, mode="epoch", key=jax.random.key(0))
    jitted = jax.jit(batch_fn)  # t is traced
    dummy = jax.random.key(7)

    def epoch(e):
        return [np.asarray(jitted(dummy, jnp.asarray(e * per_epoch + t, jnp.int32))[0]) for t in range(per_epoch)]

    e0, e1 = epoch(0), epoch(1)
    for batches in (e0, e1):
        idx = np.concatenate(batches)
        chex.assert_shape(batches, (b,))
        assert len(idx) == per_epoch * b
        assert len(np.unique(idx)) == len(idx)  # without replacement within the epoch
        assert idx.min() >= 0 and idx.max() < n
    assert not np.array_equal(np.concatenate(e0), np.concatenate(e1))  # reshuffled per epoch

    # Same as eager calls, independent of the per-step key, and tree structure preserved.
    for t in (3, per_epoch + 2):
        eager = batch_fn(jax.random.key(123), t)
        assert isinstance(eager, tuple) and len(eager) == 1
        np.testing.assert_array_equal(eager[0], jitted(dummy, jnp.asarray(t, jnp.int32))[0])


def test_minibatch_epoch_mode_keeps_arrays_aligned_and_depends_on_key():
    n, b = 40, 8
    x = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = np.arange(n, dtype=np.int32)
    fn = jax.jit(D.minibatch_fn({"x": x, "y": y}, b, key=jax.random.key(1)))
    out = fn(jax.random.key(0), jnp.int32(2))
    chex.assert_shape([out["x"], out["y"]], [(b, 3), (b,)])
    np.testing.assert_array_equal(out["x"][:, 0], out["y"].astype(np.float32))
    other = jax.jit(D.minibatch_fn({"x": x, "y": y}, b, key=jax.random.key(2)))
    first_a = np.concatenate([fn(jax.random.key(0), jnp.int32(t))["y"] for t in range(n // b)])
    first_b = np.concatenate([other(jax.random.key(0), jnp.int32(t))["y"] for t in range(n // b)])
    assert sorted(first_a) == list(range(n)) == sorted(first_b)  # n divisible by b: a permutation
    assert not np.array_equal(first_a, first_b)


def test_minibatch_iid_mode():
    n, b = 50, 50
    fn = jax.jit(D.minibatch_fn((np.arange(n),), b, mode="iid"))
    (a,) = fn(jax.random.key(0), jnp.int32(0))
    (a_again,) = fn(jax.random.key(0), jnp.int32(5))
    (c,) = fn(jax.random.key(1), jnp.int32(0))
    chex.assert_shape(a, (b,))
    assert a.min() >= 0 and a.max() < n
    np.testing.assert_array_equal(a, a_again)  # a function of the key only
    assert not np.array_equal(a, c)
    # n draws out of n: with replacement, so repeats occur (all distinct has probability 50!/50^50).
    assert len(np.unique(np.asarray(a))) < b


def test_minibatch_errors():
    arr = (np.arange(10),)
    with pytest.raises(ValueError, match="batch_size"):
        D.minibatch_fn(arr, 0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="batch_size"):
        D.minibatch_fn(arr, 11, key=jax.random.key(0))
    with pytest.raises(ValueError, match="mode"):
        D.minibatch_fn(arr, 2, mode="sequential", key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        D.minibatch_fn(arr, 2, mode="epoch")
    with pytest.raises(ValueError, match="leading axis"):
        D.minibatch_fn((np.arange(10), np.arange(9)), 2, key=jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# .npz files: happy paths


def _toy(n=60, d=4, c=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = np.arange(n) % c
    return x, y


def test_npz_train_test_layout_carves_validation(tmp_path):
    x, y = _toy()
    xt, yt = _toy(n=15, seed=1)
    path = tmp_path / "tt.npz"
    np.savez(path, X_train=x, y_train=y.astype(np.float64), X_test=xt, y_test=yt)  # integral floats OK
    d = D.load_classification_npz(str(path), val_fraction=0.2, split_seed=0)
    assert d.name == "tt.npz" and d.num_classes == 3 and d.num_features == 4
    assert len(d.y_train) == 48 and len(d.y_val) == 12
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    x32 = x.astype(np.float32)
    assert _row_counter(d.x_train, d.y_train) + _row_counter(d.x_val, d.y_val) == _row_counter(x32, y)
    np.testing.assert_array_equal(d.x_test, xt.astype(np.float32))
    np.testing.assert_array_equal(d.y_test, yt)
    np.testing.assert_array_equal(np.bincount(d.y_val), [4, 4, 4])  # stratified

    via_spec = D.load_dataset(f"npz:{path}", val_fraction=0.2, split_seed=0)
    for a, b in zip(d, via_spec, strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
    zero = D.load_dataset(f"npz:{path}", val_fraction=0.0)
    assert len(zero.y_train) == 60 and len(zero.y_val) == 0


def test_npz_explicit_validation_layout(tmp_path):
    x, y = _toy()
    xv, yv = _toy(n=9, seed=2)
    xt, yt = _toy(n=12, seed=3)
    path = tmp_path / "tvt.npz"
    np.savez(path, X_train=x, y_train=y, X_val=xv, y_val=yv, X_test=xt, y_test=yt)
    d = D.load_classification_npz(str(path), val_fraction=0.5)  # ignored: X_val is given
    np.testing.assert_array_equal(d.x_train, x.astype(np.float32))
    np.testing.assert_array_equal(d.y_train, y)
    np.testing.assert_array_equal(d.x_val, xv.astype(np.float32))
    np.testing.assert_array_equal(d.y_val, yv)
    np.testing.assert_array_equal(d.x_test, xt.astype(np.float32))
    np.testing.assert_array_equal(d.y_test, yt)
    assert d.num_classes == 3


def test_npz_xy_layout(tmp_path):
    x, y = _toy(n=100, d=5, c=4)
    path = tmp_path / "xy.npz"
    np.savez(path, X=x, y=y)
    d = D.load_dataset(f"npz:{path}", val_fraction=0.1, split_seed=5)
    assert d.num_classes == 4 and d.num_features == 5
    assert (len(d.y_train), len(d.y_val), len(d.y_test)) == (72, 8, 20)  # stratified 25 per class
    got = (_row_counter(d.x_train, d.y_train) + _row_counter(d.x_val, d.y_val)
           + _row_counter(d.x_test, d.y_test))
    assert got == _row_counter(x.astype(np.float32), y)
    d2 = D.load_dataset(f"npz:{path}", val_fraction=0.1, split_seed=5)
    np.testing.assert_array_equal(d.x_test, d2.x_test)


def test_npz_xy_layout_rare_class_stays_in_training(tmp_path):
    # One example of class 2: every split seed must keep it in training (else 'y_test' would
    # hold a label "beyond the training classes" although the file is fine).
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(25), np.ones(24), [2]].astype(np.int64)
    path = tmp_path / "rare.npz"
    np.savez(path, X=rng.normal(size=(50, 3)), y=y)
    for seed in range(8):
        d = D.load_classification_npz(str(path), split_seed=seed)
        assert d.num_classes == 3 and 2 in d.y_train


def test_unknown_dataset_spec():
    with pytest.raises(DataError, match="unknown dataset 'cifar'"):
        D.load_dataset("cifar")


# ---------------------------------------------------------------------------------------------
# .npz files: bad inputs. Shared with tests/test_cli.py.
#
# Each case: a writer ``write(path)`` creating the bad file, the key the message must name (or
# None), and substrings describing the problem.


def _good_tt(**override):
    x, y = _toy(n=30, d=4, c=3)
    xt, yt = _toy(n=9, d=4, c=3, seed=1)
    arrays = dict(X_train=x, y_train=y, X_test=xt, y_test=yt)
    arrays.update(override)
    return {k: v for k, v in arrays.items() if v is not None}


def _savez(**arrays):
    return lambda path: np.savez(path, **arrays)


def _nan_train():
    a = _good_tt()
    a["X_train"] = a["X_train"].copy()
    a["X_train"][3, 1] = np.nan
    return a


def _inf_test():
    a = _good_tt()
    a["X_test"] = a["X_test"].copy()
    a["X_test"][2, 0] = -np.inf
    return a


def _random_bytes(path):
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(256))


def _corrupt_member(path):
    # A valid zip whose stored array bytes were changed: the CRC check fails on reading.
    np.savez(path, **_good_tt())
    raw = bytearray(open(path, "rb").read())
    i = raw.find(b"\x93NUMPY") + 200  # inside the first member's data
    raw[i] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(raw))


def _truncated(path):
    np.savez(path, **_good_tt())
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])


BAD_NPZ = {
    # name: (writer, key named in the message or None, problem substrings)
    "missing_key": (_savez(**_good_tt(y_test=None)), "y_test", ["missing key"]),
    "missing_xy_key": (_savez(X=np.ones((5, 2))), "y", ["missing key"]),
    "only_x_val": (_savez(**_good_tt(X_val=np.ones((3, 4)))), "y_val", ["only one of"]),
    "nan_x_train": (_savez(**_nan_train()), "X_train", ["non-finite", "(3, 1)"]),
    "inf_x_test": (_savez(**_inf_test()), "X_test", ["non-finite", "(2, 0)"]),
    "length_mismatch": (_savez(**_good_tt(y_train=np.arange(29) % 3)), "y_train", ["29 labels", "30 rows"]),
    "object_array": (_savez(**_good_tt(X_train=np.array([{"a": 1}], dtype=object))), "X_train",
                     ["pickle"]),
    "non_integral_labels": (_savez(**_good_tt(y_train=np.arange(30) % 3 + 0.5)), "y_train", ["integer"]),
    "negative_labels": (_savez(**_good_tt(y_train=np.arange(30) % 3 - 1)), "y_train", [">= 0", "-1"]),
    "test_label_beyond_train": (_savez(**_good_tt(y_test=np.r_[np.zeros(8), [3]])), "y_test",
                                ["label 3", "3 classes"]),
    "feature_mismatch": (_savez(**_good_tt(X_test=np.ones((9, 5)))), "X_test", ["5 features", "4"]),
    "one_class": (_savez(**_good_tt(y_train=np.zeros(30))), "y_train", ["at least 2 classes"]),
    "string_labels": (_savez(**_good_tt(y_train=np.array(["a", "b", "c"] * 10))), "y_train",
                      ["integer labels"]),
    "one_dim_x": (_savez(**_good_tt(X_train=np.arange(30.0))), "X_train", ["2-D"]),
    "one_dim_x_xy": (_savez(X=np.arange(30.0), y=np.arange(30) % 2), "X", ["2-D"]),
    "not_npz": (_random_bytes, None, ["not a readable .npz"]),
    "truncated": (_truncated, None, ["not a readable .npz"]),
    "corrupt_member": (_corrupt_member, "X_train", ["corrupt"]),
    "single_npy": (lambda path: np.save(open(path, "wb"), np.ones((3, 3))), None, ["single array"]),
    "missing_file": (None, None, ["no such file"]),
}


def write_bad_npz(name, folder):
    """Writes the bad file of case ``name`` into ``folder``; returns (path, key, problems)."""
    writer, key, problems = BAD_NPZ[name]
    path = folder / f"bad_{name}.npz"
    if writer is not None:
        writer(str(path))
        assert path.exists()
    return str(path), key, problems


@pytest.mark.parametrize("name", sorted(BAD_NPZ))
def test_bad_npz_raises_data_error_naming_file_key_problem(name, tmp_path):
    path, key, problems = write_bad_npz(name, tmp_path)
    for load in (D.load_classification_npz, lambda p: D.load_dataset(f"npz:{p}")):
        with pytest.raises(DataError) as exc:
            load(path)
        msg = str(exc.value)
        assert msg.startswith(path), msg
        if key is not None:
            assert f"'{key}'" in msg, msg
        for p in problems:
            assert p in msg, msg
        assert "\n" not in msg


def test_load_npz_refuses_object_arrays_even_if_not_required(tmp_path):
    path = tmp_path / "extra.npz"
    np.savez(path, a=np.ones(3), junk=np.array([None, 1], dtype=object))
    assert set(D.load_npz(str(path), ["a"])) == {"a"}  # unrequested keys are not loaded
    with pytest.raises(DataError, match="'junk'.*pickle"):
        D.load_npz(str(path), ["a"], optional=None)


def test_data_error_is_value_error():
    assert issubclass(DataError, ValueError)


def test_minibatch_fn_precomputed_epochs_give_the_same_batches():
    """num_steps= only moves the permutations out of the loop; beyond num_steps it falls back."""
    x = jnp.arange(50 * 2.0).reshape(50, 2)
    y = jnp.arange(50)
    key = jax.random.key(3)
    lazy = D.minibatch_fn((x, y), 8, key=key)
    eager = D.minibatch_fn((x, y), 8, key=key, num_steps=20)
    run = lambda bf: jax.jit(lambda: jax.lax.map(lambda t: bf(None, t)[1], jnp.arange(40)))()
    np.testing.assert_array_equal(run(lazy), run(eager))


def test_minibatch_fn_vmapped_over_steps_equals_step_by_step():
    """Several steps' batches drawn at once with ``jax.vmap`` (inside and past the precomputed
    table of epochs, and with the shuffle key itself vmapped over seeds) are the batches of the
    steps one by one."""
    from jax import lax

    x = jnp.arange(60.0).reshape(30, 2)
    y = jnp.arange(30)
    fn = D.minibatch_fn((x, y), 7, key=jax.random.key(3), num_steps=20)  # table: 5 epochs of 4 steps
    steps = jnp.arange(14, 26)  # crosses the table's end at step 20
    drawn = jax.jit(jax.vmap(lambda t: fn(None, t)))(steps)
    for i, t in enumerate(range(14, 26)):
        one = fn(None, t)
        np.testing.assert_array_equal(np.asarray(drawn[0][i]), np.asarray(one[0]))
        np.testing.assert_array_equal(np.asarray(drawn[1][i]), np.asarray(one[1]))

    def per_seed(key):
        f = D.minibatch_fn((y,), 7, key=key, num_steps=20)
        return jax.vmap(lambda t: f(None, t))(steps)[0], lax.map(lambda t: f(None, t), steps)[0]

    a, b = jax.jit(jax.vmap(per_seed))(jax.random.split(jax.random.key(4), 3))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))  # the seeds shuffle differently
