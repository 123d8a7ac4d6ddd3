"""Benchmarks of Self-Tuning Networks (:mod:`stn_jax`) against plain training.

The network is the official STN code's MLP, 784-1200-1200-1200-10 with ReLU, batch 128, on random
data resident on the device. Its hyperparameters exercise per-example perturbation: dropout on the
input and on each of the three hidden layers, Gaussian input noise (all per example), and weight
decay (per batch, in the training loss only): ``n_h = 6``. Every layer is a best-response dense
layer (:func:`stn_jax.best_response_dense`), so each holds a general and a response weight matrix:
the response weights double the matrix work of a weight step, and about 2x a plain step is its
floor. The *plain* network is the same MLP with ordinary dense layers trained with the same
regularisers at fixed hyperparameters (dropout, noise, weight decay), one SGD step (the step each
trial of a grid or random search takes).

1. STN weight step against the plain step. Target: time ratio <= 2.0.
2. STN hyper step against the plain step. Target: <= 1.4. The hyper step differentiates the
   validation loss with respect to the hyperparameters only (the weights are stop-gradiented in
   ``make_stn``), so no weight-gradient matmuls are needed: its forward pass is twice the plain
   one (general and response matmuls), its backward pass propagates the cotangent through both
   matrices of layers 2-4 (layer 1's input does not depend on ``h``), and nothing else. The
   benchmark checks in the compiled HLO that no dot produces a weight-shaped result (a weight
   gradient), and prints the FLOPs of each step from XLA's cost analysis.
3. An epoch: STN at ``T_train:T_val = 5:1``, 60 weight steps and 12 hyper steps (12 cycles of
   ``cycle_step`` in one ``lax.scan``), against 60 plain steps in one ``lax.scan`` (the same number
   of training examples). Targets: STN <= 2.2, linearised Delta-STN
   (``STNConfig(delta=True, linearize=True)``) <= 3.5.
4. A whole tuning run on the MNIST-1D MLP of ``python -m stn_jax mlp`` (:mod:`stn_jax.mlp`,
   40-100-100-10, batch 100, Adam): STN's warm-up and cycles against one plain run of the same
   number of weight steps at fixed hyperparameters, each one jitted program on the real data.
   Target: <= 2.5. Timed at :data:`MNIST_STEPS` weight steps (a tenth of the experiment's 6,000
   with the same warm-up fraction, 1/12): the ratio is per step, and the run lengths scale alike.

The official PyTorch code, measured on 2 threads, takes 2.02x, 1.76x, 2.37x and 6.6x; they are
printed beside ours. Timings exclude compilation (every function is warmed up) and interleave the
functions compared (see :func:`benchmarks.time_interleaved`); the summary reports the ratio of the
medians.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import stn_jax
import trainstep
from benchmarks import Result, fmt_seconds, print_table, time_interleaved

SIZES = (784, 1200, 1200, 1200, 10)
BATCH = 128
EPOCH_TRAIN_STEPS = 60
T_TRAIN, T_VAL = 5, 1

MNIST_STEPS = 600
WEIGHT_TARGET, HYPER_TARGET, EPOCH_TARGET, DELTA_EPOCH_TARGET, MNIST_RUN_TARGET = 2.0, 1.4, 2.2, 3.5, 2.5
OFFICIAL = {"weight": 2.02, "hyper": 1.76, "epoch": 2.37, "delta": 6.6}  # PyTorch, 2 threads

N_LAYERS = len(SIZES) - 1
DROPOUTS = ("dropout_in",) + tuple(f"dropout_h{i}" for i in range(1, N_LAYERS))
FIXED = {"dropout_in": 0.1, **{d: 0.3 for d in DROPOUTS[1:]}, "input_noise": 0.1, "weight_decay": 1e-4}


def make_space() -> stn_jax.HParamSpace:
    return stn_jax.HParamSpace(
        [stn_jax.HParam(d, FIXED[d], low=0.0, high=0.95) for d in DROPOUTS]
        + [stn_jax.HParam("input_noise", FIXED["input_noise"], constraint="positive"),
           stn_jax.HParam("weight_decay", FIXED["weight_decay"], constraint="log", perturb="batch")])


# ---------------------------------------------------------------------------------------------
# The MLP: best-response (STN) and plain, with the same regularisers


def regularise_input(key, x, hv):
    k_noise, k_drop = jax.random.split(key)
    x = stn_jax.gaussian_noise(k_noise, x, hv["input_noise"])
    return stn_jax.dropout(k_drop, x, hv["dropout_in"])


def stn_predict(params, x, h, hvals, key, train):
    keys = jax.random.split(key, N_LAYERS)
    if train:
        x = regularise_input(keys[0], x, hvals)
    for i, p in enumerate(params):
        x = stn_jax.best_response_dense(p, x, h)
        if i < N_LAYERS - 1:
            x = jax.nn.relu(x)
            if train:
                x = stn_jax.dropout(keys[i + 1], x, hvals[DROPOUTS[i + 1]])
    return x


def loss_fn(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def kernels(params):
    return [p["general"]["kernel"] for p in params]


def stn_penalty(params, h, hvals):
    del h
    # Weight decay is drawn per batch: every row of hvals["weight_decay"] holds the same value.
    return stn_jax.l2_penalty(kernels(params), hvals["weight_decay"][0])


def init_stn_params(key):
    keys = jax.random.split(key, N_LAYERS)
    return [stn_jax.init_best_response_dense(k, m, n, len(make_space()))
            for k, m, n in zip(keys, SIZES[:-1], SIZES[1:], strict=True)]


def plain_params(stn_params):
    return [{"kernel": p["general"]["kernel"], "bias": p["general"]["bias"]} for p in stn_params]


def plain_loss(params, batch, hparams, key):
    x, y = batch
    keys = jax.random.split(key, N_LAYERS)
    x = regularise_input(keys[0], x, hparams)
    for i, p in enumerate(params):
        x = x @ p["kernel"] + p["bias"][None, :]
        if i < N_LAYERS - 1:
            x = stn_jax.dropout(keys[i + 1], jax.nn.relu(x), hparams[DROPOUTS[i + 1]])
    return jnp.mean(loss_fn(x, y)) + stn_jax.l2_penalty([p["kernel"] for p in params], hparams["weight_decay"])


def make_plain():
    return trainstep.gradient_step(plain_loss, lambda h: optax.sgd(h["learning_rate"]), has_aux=False)


def make_stn(config: stn_jax.STNConfig, passes_h_to_layers: bool = True):
    return stn_jax.make_stn(make_space(), stn_predict, loss_fn, penalty=stn_penalty,
                            weight_optimizer=optax.sgd(0.01), hyper_optimizer=optax.adam(3e-3), config=config,
                            passes_h_to_layers=passes_h_to_layers)


# ---------------------------------------------------------------------------------------------
# Data, states, jitted functions


def make_batches(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], size=(n, BATCH)).astype(np.int32)
    return jax.device_put(x), jax.device_put(y)


def plain_hparams():
    return {**{k: jnp.asarray(v, jnp.float32) for k, v in FIXED.items()},
            "learning_rate": jnp.asarray(0.01, jnp.float32)}


def epoch_fns(stn, plain):
    """Jitted epochs: ``(stn_epoch(state, train, val, key), plain_epoch(state, train, hparams, key))``."""
    n_cycles = EPOCH_TRAIN_STEPS // T_TRAIN

    @jax.jit
    def stn_epoch(state, train, val, key):
        cycles = (jax.tree.map(lambda a: a.reshape(n_cycles, T_TRAIN, *a.shape[1:]), train),
                  jax.tree.map(lambda a: a.reshape(n_cycles, T_VAL, *a.shape[1:]), val))

        def body(s, i):
            return stn.cycle_step.step(s, jax.tree.map(lambda a: a[i], cycles), None, jax.random.fold_in(key, i))

        state, metrics = lax.scan(body, state, jnp.arange(n_cycles))
        return state, metrics["val_loss"]

    @jax.jit
    def plain_epoch(state, train, hparams, key):
        def body(s, i):
            return plain.step(s, jax.tree.map(lambda a: a[i], train), hparams, jax.random.fold_in(key, i))

        state, metrics = lax.scan(body, state, jnp.arange(EPOCH_TRAIN_STEPS))
        return state, metrics["loss"]

    return stn_epoch, plain_epoch


# ---------------------------------------------------------------------------------------------
# Compiled-HLO inspection


def dot_shapes(compiled_text: str) -> list:
    """Output shapes of the dots (and matmul custom calls) in a compiled HLO module."""
    shapes = []
    for line in compiled_text.splitlines():
        if " dot(" in line or ("custom-call(" in line and "matmul" in line.lower()):
            m = re.search(r"=\s*f32\[([\d,]*)\]", line)
            if m:
                shapes.append(tuple(int(d) for d in m.group(1).split(",") if d))
    return shapes


def compiled_stats(fn, *args) -> dict:
    compiled = jax.jit(fn).lower(*args).compile()
    text = compiled.as_text()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per computation
        cost = cost[0]
    shapes = dot_shapes(text)
    weight_shapes = {(m, n) for m, n in zip(SIZES[:-1], SIZES[1:], strict=True)}
    return {"flops": float(cost.get("flops", float("nan"))), "dots": len(shapes), "shapes": shapes,
            "weight_grads": [s for s in shapes if s in weight_shapes]}


# ---------------------------------------------------------------------------------------------


def _max_abs_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def bench_steps(quick: bool) -> list:
    stn = make_stn(stn_jax.STNConfig(t_train=T_TRAIN, t_val=T_VAL))
    lin = stn_jax.STNConfig(t_train=T_TRAIN, t_val=T_VAL, delta=True, linearize=True)
    delta, delta_zeros = make_stn(lin), make_stn(lin, passes_h_to_layers=False)
    plain = make_plain()
    params = init_stn_params(jax.random.key(0))
    state, d_state = stn.init(params), delta.init(params)
    hp = plain_hparams()
    pstate = plain.init(plain_params(params), hp)
    x, y = make_batches(2, seed=1)
    train_b, val_b = (x[0], y[0]), (x[1], y[1])
    key = jax.random.key(2)

    names = ("STN weight step", "STN hyper step", "plain step", "Delta-STN lin. weight step",
             "Delta-STN lin. weight step, h = zeros")
    steps = {names[0]: (stn.weight_step.step, (state, train_b, None, key)),
             names[1]: (stn.hyper_step.step, (state, val_b, None, key)),
             names[2]: (plain.step, (pstate, train_b, hp, key)),
             names[3]: (delta.weight_step.step, (d_state, train_b, None, key)),
             names[4]: (delta_zeros.weight_step.step, (d_state, train_b, None, key))}
    stats = {name: compiled_stats(f, *args) for name, (f, args) in steps.items()}
    base = stats[names[2]]["flops"]
    print_table(["compiled step", "dots", "GFLOP (XLA cost analysis)", "FLOPs / plain step", "weight-shaped dots"],
                [[name, st["dots"], f"{st['flops'] / 1e9:.3f}", f"{st['flops'] / base:.3f}", len(st["weight_grads"])]
                 for name, st in stats.items()])
    wg = stats[names[1]]["weight_grads"]
    print("hyper step: XLA " + ("drops every weight-gradient matmul (no dot yields a weight-shaped result)"
                                if not wg else f"still computes weight-shaped dots {wg}"))

    jitted = {name: jax.jit(f) for name, (f, _) in steps.items()}
    outs = {}
    for name, (_, args) in steps.items():
        outs[name] = jitted[name](*args)
        assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(outs[name][1])), (name, outs[name][1])
    diff = _max_abs_diff(outs[names[3]][0].weights.params, outs[names[4]][0].weights.params)
    moved = _max_abs_diff(outs[names[4]][0].weights.params, params)
    print(f"linearised Delta-STN weight step, layers given None / Centred vs h = zeros: max |difference| of the "
          f"updated weights {diff:.1e} (they moved by up to {moved:.1e})")
    assert diff <= 1e-6 * max(moved, 1e-3), "the two linearised Delta-STN weight steps disagree"

    timings = time_interleaved({name: (lambda f=jitted[name], a=args: f(*a)) for name, (_, args) in steps.items()},
                               rounds=5 if quick else 15, min_sample_s=0.2 if quick else 0.5)
    print(timings.table(baseline=names[2]))
    r_w, r_h = timings.ratio(names[0], names[2]), timings.ratio(names[1], names[2])
    fl_w, fl_h = stats[names[0]]["flops"] / base, stats[names[1]]["flops"] / base
    print(f"weight step / plain step = {r_w:.3f} (target <= {WEIGHT_TARGET}, official PyTorch {OFFICIAL['weight']}, "
          f"FLOPs {fl_w:.3f}); hyper step / plain step = {r_h:.3f} (target <= {HYPER_TARGET}, official "
          f"{OFFICIAL['hyper']}, FLOPs {fl_h:.3f}); linearised Delta-STN weight step / plain step = "
          f"{timings.ratio(names[3], names[2]):.3f} (h = zeros in the layers: {timings.ratio(names[4], names[2]):.3f}; "
          f"no targets)")
    return [
        Result("STN weight step / plain step, MLP 784-1200x3-10 (time)", r_w, WEIGHT_TARGET,
               f"{fmt_seconds(timings.median(names[0]))} vs {fmt_seconds(timings.median(names[2]))}; "
               f"official {OFFICIAL['weight']}; FLOPs {fl_w:.2f}"),
        Result("STN hyper step / plain step (time)", r_h, HYPER_TARGET,
               f"{fmt_seconds(timings.median(names[1]))}; official {OFFICIAL['hyper']}; FLOPs {fl_h:.2f}; "
               f"weight-shaped dots {len(wg)}"),
    ]


def bench_epoch(quick: bool) -> list:
    plain = make_plain()
    stn = make_stn(stn_jax.STNConfig(t_train=T_TRAIN, t_val=T_VAL))
    delta = make_stn(stn_jax.STNConfig(t_train=T_TRAIN, t_val=T_VAL, delta=True, linearize=True))
    params = init_stn_params(jax.random.key(0))
    hp = plain_hparams()
    pstate = plain.init(plain_params(params), hp)
    s_stn, s_delta = stn.init(params), delta.init(params)
    train = make_batches(EPOCH_TRAIN_STEPS, seed=3)
    val = make_batches(EPOCH_TRAIN_STEPS * T_VAL // T_TRAIN, seed=4)
    key = jax.random.key(5)
    stn_epoch, plain_epoch = epoch_fns(stn, plain)
    delta_epoch, _ = epoch_fns(delta, plain)

    for name, (_, losses) in (("STN", stn_epoch(s_stn, train, val, key)),
                              ("Delta-STN", delta_epoch(s_delta, train, val, key)),
                              ("plain", plain_epoch(pstate, train, hp, key))):
        assert np.all(np.isfinite(np.asarray(losses))), f"{name} epoch: non-finite losses {losses}"

    names = ("STN epoch", "linearised Delta-STN epoch", "plain epoch")
    timings = time_interleaved({names[0]: lambda: stn_epoch(s_stn, train, val, key),
                                names[1]: lambda: delta_epoch(s_delta, train, val, key),
                                names[2]: lambda: plain_epoch(pstate, train, hp, key)},
                               rounds=3 if quick else 9, min_sample_s=0.0)
    print(timings.table(baseline=names[2]))
    r_s, r_d = timings.ratio(names[0], names[2]), timings.ratio(names[1], names[2])
    print(f"STN epoch / plain epoch = {r_s:.3f} (target <= {EPOCH_TARGET}, official {OFFICIAL['epoch']}); "
          f"linearised Delta-STN epoch / plain epoch = {r_d:.3f} (target <= {DELTA_EPOCH_TARGET}, official "
          f"{OFFICIAL['delta']})")
    detail = f"{EPOCH_TRAIN_STEPS} + {EPOCH_TRAIN_STEPS * T_VAL // T_TRAIN} steps vs {EPOCH_TRAIN_STEPS}"
    return [
        Result(f"STN epoch {T_TRAIN}:{T_VAL} / plain epoch (time)", r_s, EPOCH_TARGET,
               f"{fmt_seconds(timings.median(names[0]))} vs {fmt_seconds(timings.median(names[2]))}; {detail}; "
               f"official {OFFICIAL['epoch']}"),
        Result("linearised Delta-STN epoch / plain epoch (time)", r_d, DELTA_EPOCH_TARGET,
               f"{fmt_seconds(timings.median(names[1]))}; official {OFFICIAL['delta']}"),
    ]


def mnist1d_run_fns(steps: int = MNIST_STEPS):
    """Jitted whole runs on MNIST-1D: ``(stn_run(state, key), plain_run(state, hparams, key))`` and
    their initial states, built as :func:`stn_jax.mlp.train_stn` and :func:`stn_jax.mlp.train_fixed`
    build theirs (same steps, batches and warm-up), minus the runner's chunking and checkpoints."""
    from stn_jax import mlp

    setup = mlp.MLPSetup(steps=steps)
    data = mlp.load_data(setup)
    space = mlp.mlp_space()
    warmup = steps // 12
    cycles = (steps - warmup) // T_TRAIN
    stn = stn_jax.make_stn(space, mlp.predict, mlp.cross_entropy, penalty=mlp.weight_decay_penalty,
                           weight_optimizer=optax.adam(setup.lr), hyper_optimizer=optax.adam(3e-3),
                           config=stn_jax.STNConfig(t_train=T_TRAIN, t_val=T_VAL, centre_at_init=True))
    plain = mlp.plain_step(setup, lambda h, t: h)
    key = jax.random.key(0)
    params = mlp.init_params(key, data.num_features, data.num_classes, setup.hidden, len(space))
    train_fn = trainstep.minibatch_fn((data.x_train, data.y_train), setup.batch, key=jax.random.key(1),
                                      num_steps=steps)
    val_fn = trainstep.minibatch_fn((data.x_val, data.y_val), setup.batch, mode="iid")

    def cycle_batches(k, c):
        t0 = warmup + c * T_TRAIN
        tb = jax.vmap(lambda i: train_fn(jax.random.fold_in(k, i), t0 + i))(jnp.arange(T_TRAIN))
        vb = jax.vmap(lambda i: val_fn(jax.random.fold_in(k, 100 + i), c))(jnp.arange(T_VAL))
        return tb, vb

    @jax.jit
    def stn_run(state, key):
        k_w, k_c = jax.random.split(key)
        state, _ = trainstep.unroll(stn.weight_step, state, None, key=k_w, num_steps=warmup, batch_fn=train_fn)
        state, m = trainstep.unroll(stn.cycle_step, state, None, key=k_c, num_steps=cycles, batch_fn=cycle_batches)
        return state, m["val_loss"]

    @jax.jit
    def plain_run(state, hparams, key):
        batch_fn = lambda k, t: (*train_fn(k, t), t)
        state, m = trainstep.unroll(plain, state, hparams, key=key, num_steps=steps, batch_fn=batch_fn)
        return state, m["loss"]

    hp = {k: jnp.asarray(v, jnp.float32) for k, v in space.values(space.init_unconstrained()).items()}
    return stn_run, plain_run, stn.init(params), plain.init(params), hp, (warmup, cycles)


def bench_mnist1d_run(quick: bool) -> list:
    stn_run, plain_run, s_stn, s_plain, hp, (warmup, cycles) = mnist1d_run_fns()
    key = jax.random.key(2)
    for name, (_, losses) in (("STN", stn_run(s_stn, key)), ("plain", plain_run(s_plain, hp, key))):
        assert np.all(np.isfinite(np.asarray(losses))), f"{name} run: non-finite losses"
    names = ("STN run", "plain run")
    timings = time_interleaved({names[0]: lambda: stn_run(s_stn, key), names[1]: lambda: plain_run(s_plain, hp, key)},
                               rounds=3 if quick else 7, min_sample_s=0.0)
    print(timings.table(baseline=names[1]))
    r = timings.ratio(names[0], names[1])
    print(f"STN run / plain run = {r:.3f} (target <= {MNIST_RUN_TARGET})")
    return [Result(f"MNIST-1D MLP: whole STN run / plain run, {MNIST_STEPS} steps (time)", r, MNIST_RUN_TARGET,
                   f"{warmup} warm-up + {cycles} x ({T_TRAIN} + {T_VAL}) steps vs {MNIST_STEPS}; "
                   f"{fmt_seconds(timings.median(names[0]))} vs {fmt_seconds(timings.median(names[1]))}")]


def main(quick: bool = False) -> list:
    print(f"[1-2] STN weight and hyper steps vs a plain SGD step: MLP {'-'.join(map(str, SIZES))}, batch {BATCH}, "
          f"{len(make_space())} hyperparameters ({', '.join(make_space().names)})", flush=True)
    results = bench_steps(quick)
    print(f"\n[3] epochs: {EPOCH_TRAIN_STEPS} weight steps + {EPOCH_TRAIN_STEPS * T_VAL // T_TRAIN} hyper steps "
          f"(T_train:T_val = {T_TRAIN}:{T_VAL}) vs {EPOCH_TRAIN_STEPS} plain steps, each one jitted lax.scan",
          flush=True)
    results.extend(bench_epoch(quick))
    print(f"\n[4] whole runs on the MNIST-1D MLP of `python -m stn_jax mlp`, {MNIST_STEPS} weight steps", flush=True)
    results.extend(bench_mnist1d_run(quick))
    return results
