"""Benchmarks of the training-step core (:mod:`trainstep.core`, :mod:`trainstep.hypergrad`).

The problem throughout is the MNIST-1D reference MLP (40-100-100-10, ReLU, plain JAX so that the
hand-written baseline shares the very same model code) trained by SGD on MNIST-1D-sized random
data resident on the device (4,000 training and 1,000 validation examples of 40 features, 10
classes), minibatches of 100 drawn i.i.d. inside jit.

1. ``unroll`` against a hand-written loop: ``trainstep.unroll`` of ``gradient_step(loss, sgd)``
   for 2,000 steps, returning the final parameters and the stacked per-step metrics (the loss, as
   ``gradient_step`` records by default), against a hand-written jitted
   ``lax.fori_loop`` of the same update (same minibatch indices ``randint(fold_in(fold_in(key, t),
   0))``, same SGD arithmetic, no trainstep code). Both must reach the same final parameters.
   Target: time ratio <= 1.10. Also shown, without a target: ``unroll`` whose metrics are
   unused (XLA then removes their computation, and the loop body compiles to the same kernels as
   the hand-written one).
2. Hypergradient against forward training: ``trainstep.hypergradient`` of the validation loss
   (plain cross-entropy on the validation set) after T = 200 steps with respect to
   ``{"learning_rate", "l2"}`` (the training loss has an ``l2`` weight-decay term), against the
   forward ``unroll`` of the same 200 steps returning the final state only (the conservative
   baseline: the hypergradient computes no metrics either). Target: time ratio <= 4. Also shown,
   without targets: the same hypergradient written by hand (``jax.value_and_grad`` through a
   ``lax.scan``, to separate JAX's own cost of reverse mode from trainstep's) and with
   ``checkpoint=True``.
3. Hypergradient memory: with ``checkpoint=True``, the peak memory of the hypergradient at
   T = 2,000 against T = 200, from XLA's compiled memory analysis (see
   :func:`benchmarks.compiled_peak_bytes`; ``device.memory_stats()`` is ``None`` on CPU). Target:
   ratio <= 2. Also printed, for contrast: ``checkpoint=False`` (every step's residuals stored,
   ~10x) and ``checkpoint=1`` (each step rematerialised, still one carry stored per step, ~10x).

Timings exclude compilation (every function is warmed up) and interleave the functions compared
(see :func:`benchmarks.time_interleaved`); the summary reports the ratio of the medians.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import trainstep
from benchmarks import Result, compiled_peak_bytes, fmt_bytes, fmt_seconds, print_table, time_interleaved
from trainstep.core import auto_checkpoint_levels

N_TRAIN, N_VAL, N_FEATURES, N_CLASSES = 4000, 1000, 40, 10
HIDDEN = (100, 100)
BATCH = 100
UNROLL_STEPS = 2000
HYPER_STEPS = 200
MEMORY_STEPS = (200, 2000)

UNROLL_TARGET = 1.10
HYPER_TARGET = 4.0
MEMORY_TARGET = 2.0


# ---------------------------------------------------------------------------------------------
# Problem: plain-JAX MLP, random data on device


def make_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N_TRAIN, N_FEATURES)).astype(np.float32)
    y = rng.integers(0, N_CLASSES, size=N_TRAIN).astype(np.int32)
    xv = rng.normal(size=(N_VAL, N_FEATURES)).astype(np.float32)
    yv = rng.integers(0, N_CLASSES, size=N_VAL).astype(np.int32)
    return tuple(jax.device_put(a) for a in (x, y, xv, yv))


def init_mlp(key: jax.Array) -> dict:
    sizes = (N_FEATURES, *HIDDEN, N_CLASSES)
    params = {}
    for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:], strict=False)):
        key, sub = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(sub, (m, n), jnp.float32) * jnp.sqrt(2.0 / m)
        params[f"b{i}"] = jnp.zeros((n,), jnp.float32)
    return params


def mlp_apply(params: dict, x: jax.Array) -> jax.Array:
    n_layers = len(HIDDEN) + 1
    for i in range(n_layers):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < n_layers - 1:
            x = jax.nn.relu(x)
    return x


def cross_entropy(params: dict, batch) -> jax.Array:
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x), y).mean()


def l2_loss(params, batch, hparams, key):
    """Training loss with a weight-decay term taken from the hyperparameters."""
    del key
    sq = sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))
    return cross_entropy(params, batch) + 0.5 * hparams["l2"] * sq


def sgd(hparams):
    return optax.sgd(hparams["learning_rate"])


# ---------------------------------------------------------------------------------------------
# 1. unroll vs a hand-written fori_loop


def make_unroll_fns(num_steps: int):
    """``(unroll returning the final params and the per-step metrics, the same returning the final
    params only, the hand-written fori_loop)``, all jitted."""
    ts = trainstep.gradient_step(lambda p, b, h, k: cross_entropy(p, b), sgd, has_aux=False)

    def run_unroll(params, hparams, key, x, y):
        state = ts.init(params, hparams)
        batch_fn = trainstep.minibatch_fn((x, y), BATCH, mode="iid")
        final, metrics = trainstep.unroll(ts, state, hparams, key=key, num_steps=num_steps, batch_fn=batch_fn)
        return final.params, metrics

    @jax.jit
    def with_metrics(params, hparams, key, x, y):
        return run_unroll(params, hparams, key, x, y)  # the loss curve (and grad norms) a user keeps

    @jax.jit
    def params_only(params, hparams, key, x, y):
        return run_unroll(params, hparams, key, x, y)[0]  # metrics unused: XLA removes their computation

    @jax.jit
    def by_hand(params, learning_rate, key, x, y):
        n = x.shape[0]

        def body(t, p):
            k = jax.random.fold_in(jax.random.fold_in(key, t), 0)
            idx = jax.random.randint(k, (BATCH,), 0, n)
            g = jax.grad(cross_entropy)(p, (x[idx], y[idx]))
            return jax.tree.map(lambda w, gw: w - learning_rate * gw, p, g)

        return lax.fori_loop(0, num_steps, body, params)

    return with_metrics, params_only, by_hand


def _max_abs_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def bench_unroll(data, quick: bool) -> list:
    x, y, _, _ = data
    params = init_mlp(jax.random.key(1))
    key = jax.random.key(2)
    lr = jnp.asarray(0.05, jnp.float32)
    hparams = {"learning_rate": lr}
    with_metrics, params_only, by_hand = make_unroll_fns(UNROLL_STEPS)

    p_ts, metrics = with_metrics(params, hparams, key, x, y)
    p_ts2 = params_only(params, hparams, key, x, y)
    p_ref = by_hand(params, lr, key, x, y)
    same = all(np.allclose(a, b, rtol=1e-4, atol=1e-5)
               for p in (p_ts, p_ts2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref), strict=True))
    print(f"final params after {UNROLL_STEPS} steps: max |unroll - fori_loop| = "
          f"{max(_max_abs_diff(p_ts, p_ref), _max_abs_diff(p_ts2, p_ref)):.2e} (params moved by up to "
          f"{_max_abs_diff(p_ref, params):.2e}); allclose(rtol=1e-4, atol=1e-5): {same}; "
          f"final minibatch loss {float(metrics['loss'][-1]):.4f}")
    assert same, "unroll and the hand-written loop disagree: the timing comparison would not be fair"

    a, b, ref = "unroll, returns params + metrics", "unroll, returns params only", "hand-written fori_loop"
    timings = time_interleaved({a: lambda: with_metrics(params, hparams, key, x, y),
                                b: lambda: params_only(params, hparams, key, x, y),
                                ref: lambda: by_hand(params, lr, key, x, y)},
                               rounds=3 if quick else 9)
    print(timings.table(baseline=ref))
    print(f"ratio of medians, unroll (params + metrics) / fori_loop = {timings.ratio(a, ref):.3f} "
          f"(target <= {UNROLL_TARGET}); params only: {timings.ratio(b, ref):.3f} (no target); "
          f"fori_loop: {fmt_seconds(timings.median(ref) / UNROLL_STEPS)} per step")
    return [Result("unroll / fori_loop, MLP SGD, 2,000 steps (time)", timings.ratio(a, ref), UNROLL_TARGET,
                   f"{fmt_seconds(timings.median(a))} vs {fmt_seconds(timings.median(ref))}; "
                   f"params-only unroll {timings.ratio(b, ref):.3f}")]


# ---------------------------------------------------------------------------------------------
# 2. and 3. hypergradients


def make_hyper_fns(num_steps: int, checkpoint=False):
    """``(hypergradient, forward unroll returning the final state only)``, not jitted."""
    ts = trainstep.gradient_step(l2_loss, sgd, has_aux=False)

    def hypergrad(params, hparams, key, x, y, xv, yv):
        state = ts.init(params, hparams)
        batch_fn = trainstep.minibatch_fn((x, y), BATCH, mode="iid")
        val_fn = lambda s: cross_entropy(s.params, (xv, yv))  # noqa: E731 - plain loss, no l2
        return trainstep.hypergradient(ts, state, hparams, val_fn, key=key, num_steps=num_steps,
                                       batch_fn=batch_fn, checkpoint=checkpoint)

    def forward(params, hparams, key, x, y):
        state = ts.init(params, hparams)
        batch_fn = trainstep.minibatch_fn((x, y), BATCH, mode="iid")
        return trainstep.unroll(ts, state, hparams, key=key, num_steps=num_steps, batch_fn=batch_fn)[0]

    return hypergrad, forward


def make_hand_hypergrad(num_steps: int):
    """The same hypergradient written directly: ``jax.value_and_grad`` through a ``lax.scan``."""

    def hypergrad(params, hparams, key, x, y, xv, yv):
        n = x.shape[0]

        def train(h):
            def body(p, t):
                k = jax.random.fold_in(jax.random.fold_in(key, t), 0)
                idx = jax.random.randint(k, (BATCH,), 0, n)
                g = jax.grad(l2_loss)(p, (x[idx], y[idx]), h, None)
                return jax.tree.map(lambda w, gw: w - h["learning_rate"] * gw, p, g), None

            return lax.scan(body, params, jnp.arange(num_steps, dtype=jnp.int32))[0]

        return jax.value_and_grad(lambda h: cross_entropy(train(h), (xv, yv)))(hparams)

    return hypergrad


def hyper_args(data):
    x, y, xv, yv = data
    params = init_mlp(jax.random.key(1))
    hparams = {"learning_rate": jnp.asarray(0.05, jnp.float32), "l2": jnp.asarray(1e-3, jnp.float32)}
    return params, hparams, jax.random.key(3), x, y, xv, yv


def bench_hypergradient(data, quick: bool) -> list:
    args = hyper_args(data)
    hypergrad, forward = (jax.jit(f) for f in make_hyper_fns(HYPER_STEPS))
    hypergrad_ckpt, _ = make_hyper_fns(HYPER_STEPS, checkpoint=True)
    hypergrad_ckpt = jax.jit(hypergrad_ckpt)
    by_hand = jax.jit(make_hand_hypergrad(HYPER_STEPS))

    val_loss, grads = hypergrad(*args)
    print(f"T = {HYPER_STEPS}: validation loss {float(val_loss):.4f}, d/d learning_rate = "
          f"{float(grads['learning_rate']):.4g}, d/d l2 = {float(grads['l2']):.4g}")
    assert all(np.isfinite(float(g)) for g in jax.tree.leaves(grads)), "non-finite hypergradient"
    for name, fn in (("hand-written", by_hand), ("checkpoint=True", hypergrad_ckpt)):
        other = fn(*args)
        ok = all(np.allclose(u, v, rtol=1e-4, atol=1e-6)
                 for u, v in zip(jax.tree.leaves((val_loss, grads)), jax.tree.leaves(other), strict=True))
        assert ok, f"the {name} hypergradient differs from trainstep.hypergradient: {other} vs {(val_loss, grads)}"
    print("hand-written jax.grad through lax.scan and checkpoint=True give the same value and gradient (allclose)")

    hg, fw = "hypergradient", "unroll forward, final state only"
    hand, ckpt = "hand-written hypergradient", "hypergradient, checkpoint=True"
    timings = time_interleaved({hg: lambda: hypergrad(*args), hand: lambda: by_hand(*args),
                                ckpt: lambda: hypergrad_ckpt(*args), fw: lambda: forward(*args[:5])},
                               rounds=3 if quick else 7)
    print(timings.table(baseline=fw))
    print(f"ratio of medians, hypergradient / unroll = {timings.ratio(hg, fw):.3f} (target <= {HYPER_TARGET}); "
          f"hand-written hypergradient / unroll = {timings.ratio(hand, fw):.3f}, checkpoint=True "
          f"({auto_checkpoint_levels(HYPER_STEPS)} levels) / unroll = {timings.ratio(ckpt, fw):.3f} (no targets)")
    return [Result("hypergradient / unroll, T=200 (time)", timings.ratio(hg, fw), HYPER_TARGET,
                   f"{fmt_seconds(timings.median(hg))} vs {fmt_seconds(timings.median(fw))}; "
                   f"hand-written {timings.ratio(hand, fw):.3f}")]


def bench_memory(data, quick: bool) -> list:
    del quick  # compile-time analysis: deterministic, nothing to repeat
    args = hyper_args(data)
    settings = [("checkpoint=True", True), ("checkpoint=False", False), ("checkpoint=1", 1)]
    rows, ratios = [], {}
    for label, ckpt in settings:
        peaks = {}
        for t in MEMORY_STEPS:
            hypergrad, _ = make_hyper_fns(t, checkpoint=ckpt)
            m = compiled_peak_bytes(hypergrad, *args)
            peaks[t] = m["peak"]
            levels = auto_checkpoint_levels(t) if ckpt is True else (ckpt if ckpt else "-")
            rows.append([label, t, levels, fmt_bytes(m["peak"]), fmt_bytes(m["temp"]), fmt_bytes(m["argument"]),
                         fmt_bytes(m["output"]), fmt_bytes(m["alias"])])
        ratios[label] = peaks[MEMORY_STEPS[1]] / peaks[MEMORY_STEPS[0]]
    print("peak = temp + argument + output - alias, from jax.jit(f).lower(...).compile().memory_analysis()")
    print_table(["setting", "T", "levels", "peak", "temp", "argument", "output", "alias"], rows)
    for label, r in ratios.items():
        note = f"(target <= {MEMORY_TARGET})" if label == "checkpoint=True" else "(for contrast, no target)"
        print(f"{label}: peak(T={MEMORY_STEPS[1]}) / peak(T={MEMORY_STEPS[0]}) = {r:.3f} {note}")
    return [Result("hypergradient peak memory T=2000 / T=200, checkpoint=True", ratios["checkpoint=True"],
                   MEMORY_TARGET, f"checkpoint=False {ratios['checkpoint=False']:.2f}, "
                                  f"checkpoint=1 {ratios['checkpoint=1']:.2f}")]


def main(quick: bool = False) -> list:
    data = make_data()
    print(f"[1] unroll vs hand-written fori_loop: MLP {N_FEATURES}-{HIDDEN[0]}-{HIDDEN[1]}-{N_CLASSES}, "
          f"batch {BATCH} iid from {N_TRAIN} on-device examples, SGD, {UNROLL_STEPS} steps", flush=True)
    results = bench_unroll(data, quick)
    print(f"\n[2] hypergradient w.r.t. {{learning_rate, l2}} vs forward unroll, T = {HYPER_STEPS}", flush=True)
    results.extend(bench_hypergradient(data, quick))
    print(f"\n[3] hypergradient peak memory, T = {MEMORY_STEPS[1]} vs T = {MEMORY_STEPS[0]}", flush=True)
    results.extend(bench_memory(data, quick))
    return results
