"""What is unrolled: the rule training a fresh base model on a task, scored by the few-shot readout.

An *episode* samples a task, a fresh base model and a total inner length ``T``; the rule then trains the
model on the task's unlabelled data, one minibatch a step. Meta-training runs an episode in *truncations*
of ``K`` steps (``K`` sampled at each call), each returning the readout loss averaged over its steps, so
that the meta-objective is the readout loss averaged along the whole trajectory (Metz et al. 2019) and
an estimator can differentiate one truncation at a time. When an episode reaches ``T`` steps it is
replaced by a fresh one. Sampling ``T`` and ``K`` limits truncation bias (the paper's remedy).

:class:`TruncatedUnroll` is the interface the estimators of :mod:`meta_rules.estimators` need: any
``init(key)`` and ``unroll(theta, state, key) -> (state, loss, done)`` works (the tests use a toy one).
Labels enter only the readout: the rule step receives ``x`` alone, so the trajectory cannot depend on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp

from meta_rules.base_model import activation_fn, check_sizes, init_base_mlp, representation
from meta_rules.readout import LOSSES, few_shot_ridge_loss
from meta_rules.rule import DEFAULT_RULE_CONFIG, RuleConfig, RuleState, make_rule_step
from meta_rules.tasks import Task, TaskFn
from trainstep.core import unroll as trainstep_unroll
from trainstep.runner import ConfigError

PyTree = Any


class TruncatedUnroll(NamedTuple):
    """An inner problem run in truncations (the *what is unrolled* of learned_optimization).

    Attributes:
      init: ``init(key) -> state``, a fresh episode (independent of θ, so that antithetic particles reset
        identically).
      unroll: ``unroll(theta, state, key) -> (state, loss, done)``: one truncation; ``loss`` is its
        scalar meta-loss and ``done`` whether the episode ended in it (the returned state is then a fresh
        episode drawn from ``key``).
    """

    init: Callable[[jax.Array], PyTree]
    unroll: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, jax.Array, jax.Array]]


class MetaState(NamedTuple):
    """One episode in progress: the rule's state (base parameters, step reached), its task, its length."""

    rule_state: RuleState
    task: Task
    length: jax.Array
    key: jax.Array  # seeds the episode's minibatches


@dataclasses.dataclass(frozen=True)
class UnrollConfig:
    """How episodes run (static).

    Attributes:
      sizes: base model ``(input, hidden..., representation)``; the input must match the tasks.
      activation: base model nonlinearity; normalize: its batch norm.
      batch_size: unlabelled examples per inner step.
      truncation: ``(K_min, K_max)``, inclusive range of steps per truncation (``K_max`` are computed, the
        steps beyond the sampled ``K`` are masked).
      length: ``(T_min, T_max)``, inclusive range of an episode's total inner steps.
      readout_loss: ``"cosine"`` or ``"mse"``; readout_l2: the ridge penalty.
      checkpoint: passed to :func:`trainstep.unroll` (``True``: nested ``jax.checkpoint`` over a truncation).
    """

    sizes: tuple = (64, 32, 32)
    activation: str = "relu"
    normalize: bool = True
    batch_size: int = 32
    truncation: tuple = (10, 10)
    length: tuple = (50, 200)
    readout_loss: str = "cosine"
    readout_l2: float = 0.1
    checkpoint: Union[bool, int] = False

    def __post_init__(self):
        object.__setattr__(self, "sizes", check_sizes(self.sizes))
        activation_fn(self.activation)
        for name in ("truncation", "length"):
            lo_hi = tuple(getattr(self, name))
            if len(lo_hi) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in lo_hi) \
                    or not 1 <= lo_hi[0] <= lo_hi[1]:
                raise ConfigError(f"UnrollConfig.{name} must be integers (min, max) with 1 <= min <= max, "
                                  f"got {getattr(self, name)!r}")
            object.__setattr__(self, name, lo_hi)
        if self.batch_size < 2:
            raise ConfigError(f"UnrollConfig.batch_size must be >= 2 (the rule uses batch statistics), "
                              f"got {self.batch_size}")
        if self.readout_loss not in LOSSES:
            raise ConfigError(f"unknown readout loss {self.readout_loss!r}: expected one of {list(LOSSES)}")
        if not self.readout_l2 > 0:
            raise ConfigError(f"UnrollConfig.readout_l2 must be > 0, got {self.readout_l2}")


def task_readout_loss(params, task: Task, *, num_classes: int, activation: str = "relu", normalize: bool = True,
                      loss: str = "cosine", l2: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """Few-shot ridge readout of the base model's representation on a task: ``(loss, accuracy)``.

    Support and query go through the base model in one batch (its batch norm sees both; no labels).
    """
    n_s = task.x_support.shape[0]
    feats = representation(params, jnp.concatenate([task.x_support, task.x_query]), activation=activation,
                           normalize=normalize)
    return few_shot_ridge_loss(feats[:n_s], task.y_support, feats[n_s:], task.y_query, num_classes, l2=l2,
                               loss=loss)


def _check_task_shapes(task_fn: TaskFn, sizes: Sequence[int], batch_size: int, num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    shapes = jax.eval_shape(task_fn, jax.random.key(0))
    if shapes.x_unlabelled.shape[1] != sizes[0]:
        raise ConfigError(f"the tasks have {shapes.x_unlabelled.shape[1]} features but the base model's input "
                          f"size is {sizes[0]}")
    if batch_size > shapes.x_unlabelled.shape[0]:
        raise ConfigError(f"batch_size {batch_size} exceeds the {shapes.x_unlabelled.shape[0]} unlabelled "
                          "examples of a task")


def make_meta_unroll(task_fn: TaskFn, num_classes: int, config: UnrollConfig = UnrollConfig(),
                     rule_config: RuleConfig = DEFAULT_RULE_CONFIG) -> TruncatedUnroll:
    """Episodes of the learned rule on tasks from ``task_fn``, as a :class:`TruncatedUnroll`.

    Args:
      task_fn: ``sample(key) -> Task`` (see :mod:`meta_rules.tasks`).
      num_classes: classes per task (the readout's width).
      config: episode settings.
      rule_config: the rule's shape.

    Returns:
      A :class:`TruncatedUnroll` whose states are :class:`MetaState` and whose loss is the readout loss
      averaged over the steps of a truncation (measured after each step).

    Example:
      >>> mu = make_meta_unroll(tasks.clustered_task_fn(16, TaskConfig()), 5, UnrollConfig(sizes=(16, 8)))
      >>> state = mu.init(jax.random.key(0))
      >>> state, loss, done = mu.unroll(theta, state, jax.random.key(1))
    """
    if not isinstance(config, UnrollConfig):
        raise ConfigError(f"config must be an UnrollConfig, got {type(config).__name__}")
    _check_task_shapes(task_fn, config.sizes, config.batch_size, num_classes)
    rule = make_rule_step(rule_config, activation=config.activation, normalize=config.normalize)
    k_min, k_max = config.truncation
    t_min, t_max = config.length
    readout = lambda params, task: task_readout_loss(params, task, num_classes=num_classes,
                                                     activation=config.activation, normalize=config.normalize,
                                                     loss=config.readout_loss, l2=config.readout_l2)

    def init(key: jax.Array) -> MetaState:
        k_task, k_params, k_len, k_run = jax.random.split(key, 4)
        return MetaState(rule_state=rule.init(init_base_mlp(k_params, config.sizes)), task=task_fn(k_task),
                         length=jax.random.randint(k_len, (), t_min, t_max + 1), key=k_run)

    def unroll(theta: PyTree, state: MetaState, key: jax.Array):
        k_trunc, k_reset = jax.random.split(key)
        start = state.rule_state.step
        end = jnp.minimum(start + jax.random.randint(k_trunc, (), k_min, k_max + 1), state.length)
        x_pool = state.task.x_unlabelled

        def batch_fn(k, t):
            return x_pool[jax.random.randint(k, (config.batch_size,), 0, x_pool.shape[0])]

        def step(rs, x, th, k):
            new, _ = rule.step(rs, x, th, k)
            active = rs.step < end
            rs = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, rs)
            loss, acc = readout(rs.params, state.task)
            return rs, {"loss": loss, "accuracy": acc, "active": active}

        rs, m = trainstep_unroll(step, state.rule_state, theta, key=state.key, num_steps=k_max,
                                 batch_fn=batch_fn, checkpoint=config.checkpoint, step_offset=start)
        w = m["active"].astype(m["loss"].dtype)
        loss = jnp.sum(m["loss"] * w) / jnp.maximum(jnp.sum(w), 1.0)
        done = end >= state.length
        fresh = init(k_reset)
        new_state = jax.tree.map(lambda f, o: jnp.where(done, f, o), fresh, state._replace(rule_state=rs))
        return new_state, loss, done

    return TruncatedUnroll(init=init, unroll=unroll)


def evaluate_rule(theta: PyTree, task_fn: TaskFn, num_classes: int, *, key: jax.Array, num_tasks: int,
                  num_steps: int, config: UnrollConfig = UnrollConfig(),
                  rule_config: RuleConfig = DEFAULT_RULE_CONFIG, eval_every: int = 1) -> dict:
    """Few-shot readout of a rule's representation along ``num_steps`` steps, on a batch of fresh tasks.

    Args:
      theta: the rule's meta-parameters.
      task_fn, num_classes: the task distribution (e.g. held-out MNIST-1D).
      key: PRNG key (tasks, base-model initialisations, minibatches).
      num_tasks: tasks evaluated (vmapped).
      num_steps: inner steps of the rule.
      config: base model and readout settings (``truncation``/``length`` unused).
      rule_config: the rule's shape.
      eval_every: score the readout every this many steps (step 0 is the random initialisation).

    Returns:
      ``{"step": (E,), "loss": (num_tasks, E), "accuracy": (num_tasks, E)}`` with ``E`` evaluation points
      including step 0.

    Example:
      >>> out = jax.jit(lambda th: evaluate_rule(th, mnist1d, 5, key=k, num_tasks=16, num_steps=200,
      ...                                         config=UnrollConfig(sizes=(40, 32, 32))))(theta)
    """
    if num_steps < 0 or eval_every < 1:
        raise ConfigError(f"need num_steps >= 0 and eval_every >= 1, got {num_steps}, {eval_every}")
    _check_task_shapes(task_fn, config.sizes, config.batch_size, num_classes)
    rule = make_rule_step(rule_config, activation=config.activation, normalize=config.normalize)
    readout = lambda params, task: task_readout_loss(params, task, num_classes=num_classes,
                                                     activation=config.activation, normalize=config.normalize,
                                                     loss=config.readout_loss, l2=config.readout_l2)
    chunks = num_steps // eval_every

    def one(k):
        k_task, k_params, k_run = jax.random.split(k, 3)
        task = task_fn(k_task)
        x_pool = task.x_unlabelled
        batch_fn = lambda kb, t: x_pool[jax.random.randint(kb, (config.batch_size,), 0, x_pool.shape[0])]
        state0 = rule.init(init_base_mlp(k_params, config.sizes))

        def chunk(state, c):
            state, _ = trainstep_unroll(rule, state, theta, key=k_run, num_steps=eval_every, batch_fn=batch_fn,
                                        step_offset=c * eval_every)
            return state, readout(state.params, task)

        _, (losses, accs) = jax.lax.scan(chunk, state0, jnp.arange(chunks))
        l0, a0 = readout(state0.params, task)
        return jnp.concatenate([l0[None], losses]), jnp.concatenate([a0[None], accs])

    losses, accs = jax.vmap(one)(jax.random.split(key, num_tasks))
    return {"step": jnp.arange(chunks + 1) * eval_every, "loss": losses, "accuracy": accs}
