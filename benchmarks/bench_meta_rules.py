"""Benchmarks of meta-training a learned unsupervised update rule (:mod:`meta_rules`).

The problem is the meta-training run's default setting (``python -m meta_rules meta-train``, sizes read
from :func:`meta_rules.cli.meta_train_config`): the rule (16-wide per-neuron network, 4 channels)
training a 64-32-32 ReLU MLP with batch norm on 10-way tasks from the meta-training distribution
(augmented digits mixed with clustered tasks), 32 unlabelled examples a step, the few-shot cosine ridge
readout scored after every step. Truncations have a fixed length of 20 steps here (and episodes of
1,000 steps, so none ends during the timing).

1. Meta-gradient against the forward unroll: :func:`meta_rules.truncated_backprop` (``jax.value_and_grad``
   through ``trainstep.unroll`` of 20 rule steps, with the readout after each) against the forward
   unroll of the same truncation (same loss, no gradient), both on one task. Target: time ratio <= 4.
   Also shown, without targets: the same with ``UnrollConfig(checkpoint=True)`` (nested
   ``jax.checkpoint``), and the ratio on 8 tasks.
2. Eight vmapped tasks against one: the truncated-backprop estimate on a batch of 8 episodes (one
   ``jax.vmap``) against the same on one episode. Target: time ratio <= 3 (perfect batching would be
   1; one task at a time would be 8).

Timings exclude compilation (every function is warmed up) and interleave the functions compared
(see :func:`benchmarks.time_interleaved`); the summary reports the ratio of the medians.

What was measured on a 2-core CPU shared with other jobs (noisy: two runs gave 6.3 and 3.3 for the
first ratio, 7.9 and 14 for the second):

* The backward pass through the readout scored after *every* step costs as much again as the backward
  through the rule: in a separate measurement (the same rule and sizes, 20 steps) the gradient/forward
  ratio was 4.8 with the readout only at the end and 8.6 with it after every step, although both
  forward passes cost the same; per-step ``jax.checkpoint`` brought the latter to 6.1 (on CPU, storing
  every step's residuals costs memory traffic).
* On CPU, vmapping tasks does not amortise anything: one task's truncation is already compute-bound,
  so 8 tasks cost about 8 times one (the forward alike). The <= 3 target assumes an accelerator whose
  parallel units one task leaves idle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import meta_rules as mr
from benchmarks import Result, fmt_seconds, time_interleaved
from meta_rules.cli import meta_train_config

TRUNCATION = 20
TASKS = 8
GRAD_TARGET = 4.0
VMAP_TARGET = 3.0

DEFAULTS = meta_train_config()
RULE_CONFIG = mr.RuleConfig(**{k: DEFAULTS[k] for k in ("hidden", "channels", "max_step", "decay_steps")
                               if k in DEFAULTS})
TASK_CONFIG = mr.TaskConfig(num_classes=DEFAULTS["num_classes"], shots=DEFAULTS["shots"], queries=10, unlabelled=32)
SIZES = (64,) + (DEFAULTS["width"],) * DEFAULTS["depth"]


def unroll_config(checkpoint=False) -> mr.UnrollConfig:
    return mr.UnrollConfig(sizes=SIZES, activation=DEFAULTS["activation"], batch_size=DEFAULTS["batch"],
                           truncation=(TRUNCATION, TRUNCATION), length=(1000, 1000), checkpoint=checkpoint)


def make_fns(task_fn, checkpoint=False):
    """``(meta-gradient, forward)`` over a batch of episode states, jitted."""
    mu = mr.make_meta_unroll(task_fn, TASK_CONFIG.num_classes, unroll_config(checkpoint), RULE_CONFIG)

    @jax.jit
    def meta_gradient(theta, states, key):
        out = mr.truncated_backprop(mu, theta, states, key)
        return out.loss, out.grad, out.states

    @jax.jit
    def forward(theta, states, key):
        keys = jax.random.split(key, jax.tree.leaves(states)[0].shape[0])  # as truncated_backprop splits
        new_states, losses, _ = jax.vmap(mu.unroll, in_axes=(None, 0, 0))(theta, states, keys)
        return jnp.mean(losses), new_states

    return mu, meta_gradient, forward


def main(quick: bool = False) -> list:
    task_fn = mr.meta_train_task_fn(TASK_CONFIG)
    mu, grad_fn, fwd_fn = make_fns(task_fn)
    _, grad_ckpt_fn, _ = make_fns(task_fn, checkpoint=True)
    theta = mr.init_theta(jax.random.key(0), RULE_CONFIG)
    states8 = jax.jit(lambda k: mr.init_states(mu, k, TASKS))(jax.random.key(1))
    states1 = jax.tree.map(lambda a: a[:1], states8)
    key = jax.random.key(2)
    print(f"{RULE_CONFIG}; base MLP {'-'.join(map(str, SIZES))} {DEFAULTS['activation']} + batch norm; "
          f"{TASK_CONFIG.num_classes}-way tasks, batch {DEFAULTS['batch']}, truncation {TRUNCATION} steps, "
          "readout every step", flush=True)

    loss, grad, _ = grad_fn(theta, states1, key)
    loss_f, _ = fwd_fn(theta, states1, key)
    loss_c, grad_c, _ = grad_ckpt_fn(theta, states1, key)
    gnorm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grad))))
    same = np.allclose(loss, loss_f, rtol=1e-5) and all(
        np.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(grad_c),
                                                                strict=True))
    print(f"one task: truncation loss {float(loss):.4f} (forward {float(loss_f):.4f}), |meta-gradient| {gnorm:.3g}; "
          f"checkpoint=True gives the same loss and gradient: {same}")
    assert np.isfinite(gnorm) and same, "the functions timed disagree"

    g1, f1, c1 = "meta-gradient, 1 task", "forward unroll, 1 task", "meta-gradient checkpoint=True, 1 task"
    g8, f8 = f"meta-gradient, {TASKS} tasks (vmap)", f"forward unroll, {TASKS} tasks (vmap)"
    timings = time_interleaved({g1: lambda: grad_fn(theta, states1, key), f1: lambda: fwd_fn(theta, states1, key),
                                c1: lambda: grad_ckpt_fn(theta, states1, key),
                                g8: lambda: grad_fn(theta, states8, key), f8: lambda: fwd_fn(theta, states8, key)},
                               rounds=3 if quick else 7)
    print(timings.table(baseline=f1))
    grad_ratio, vmap_ratio = timings.ratio(g1, f1), timings.ratio(g8, g1)
    print(f"ratio of medians, meta-gradient / forward (1 task) = {grad_ratio:.3f} (target <= {GRAD_TARGET}); "
          f"checkpoint=True {timings.ratio(c1, f1):.3f}, on {TASKS} tasks {timings.ratio(g8, f8):.3f} (no targets)")
    print(f"ratio of medians, meta-gradient on {TASKS} vmapped tasks / on 1 task = {vmap_ratio:.3f} "
          f"(target <= {VMAP_TARGET}); forward {timings.ratio(f8, f1):.3f} (no target); "
          f"per meta-gradient step on {TASKS} tasks: {fmt_seconds(timings.median(g8))}")
    return [Result(f"meta-gradient / forward unroll, {TRUNCATION}-step truncation (time)", grad_ratio, GRAD_TARGET,
                   f"{fmt_seconds(timings.median(g1))} vs {fmt_seconds(timings.median(f1))}; "
                   f"checkpoint=True {timings.ratio(c1, f1):.2f}"),
            Result(f"meta-gradient, {TASKS} vmapped tasks / 1 task (time)", vmap_ratio, VMAP_TARGET,
                   f"{fmt_seconds(timings.median(g8))} vs {fmt_seconds(timings.median(g1))}; "
                   f"forward {timings.ratio(f8, f1):.2f}")]


if __name__ == "__main__":
    main()
