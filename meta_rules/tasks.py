"""Distributions of unsupervised tasks: pure ``sample(key) -> Task`` functions, jit- and vmap-friendly.

A task is an unlabelled dataset the rule trains on, plus a few labelled examples per class (support) and
others (query) for the few-shot readout that scores the representation. Meta-training draws tasks from
digits (random class subsets, pixel permutations, noise, shifts) and from synthetic clustered data;
MNIST-1D is held out for evaluation. Inputs are standardised per task with the statistics of the
unlabelled set, so one rule sees inputs on one scale whatever the source.

Every sampler of a distribution returns arrays of the same shapes, so a batch of tasks is ``jax.vmap(sample)``
over keys and a mixture is a ``lax.switch``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from trainstep.runner import ConfigError

STANDARDIZE_EPS = 1e-3


class Task(NamedTuple):
    """One unsupervised task. Only ``x_unlabelled`` reaches the rule; the labels serve the readout alone."""

    x_unlabelled: jax.Array  # (N, D)
    x_support: jax.Array     # (C * shots, D)
    y_support: jax.Array     # (C * shots,) int32 in [0, C)
    x_query: jax.Array       # (C * queries, D)
    y_query: jax.Array       # (C * queries,)


TaskFn = Callable[[jax.Array], Task]


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Sizes shared by every task of a distribution (static: they fix the arrays' shapes).

    Attributes:
      num_classes: classes per task (``C``-way readout).
      shots: labelled support examples per class.
      queries: labelled query examples per class.
      unlabelled: unlabelled examples per class (the rule's training set has ``C * unlabelled``).
    """

    num_classes: int = 5
    shots: int = 10
    queries: int = 10
    unlabelled: int = 32

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"TaskConfig.{f.name} must be a positive integer, got {v!r}")
        if self.num_classes < 2:
            raise ConfigError(f"TaskConfig.num_classes must be >= 2, got {self.num_classes}")

    @property
    def per_class(self) -> int:
        return self.unlabelled + self.shots + self.queries


def standardize_task(task: Task) -> Task:
    """Standardises every feature with the mean and spread of the unlabelled set (no labels used)."""
    mean = jnp.mean(task.x_unlabelled, axis=0, keepdims=True)
    std = jnp.std(task.x_unlabelled, axis=0, keepdims=True) + STANDARDIZE_EPS
    f = lambda x: (x - mean) / std
    return task._replace(x_unlabelled=f(task.x_unlabelled), x_support=f(task.x_support), x_query=f(task.x_query))


def _split_per_class(x_CMD: jax.Array, config: TaskConfig) -> Task:
    c, u, s = config.num_classes, config.unlabelled, config.shots
    d = x_CMD.shape[-1]
    labels = lambda n: jnp.repeat(jnp.arange(c, dtype=jnp.int32), n)
    return Task(x_unlabelled=x_CMD[:, :u].reshape(c * u, d),
                x_support=x_CMD[:, u:u + s].reshape(c * s, d), y_support=labels(s),
                x_query=x_CMD[:, u + s:].reshape(c * config.queries, d), y_query=labels(config.queries))


def _augment(key: jax.Array, x_CMD: jax.Array, *, permute_prob: float, noise_max: float, max_shift: int,
             image_shape: Optional[tuple[int, int]]) -> jax.Array:
    """One random transformation of the whole task (every example alike), plus per-example noise."""
    k_perm, k_flag, k_shift, k_sigma, k_noise = jax.random.split(key, 5)
    d = x_CMD.shape[-1]
    if max_shift > 0:
        shifts = jax.random.randint(k_shift, (2,), -max_shift, max_shift + 1)
        if image_shape is not None:
            img = x_CMD.reshape(x_CMD.shape[:-1] + tuple(image_shape))
            x_CMD = jnp.roll(img, (shifts[0], shifts[1]), axis=(-2, -1)).reshape(x_CMD.shape)
        else:
            x_CMD = jnp.roll(x_CMD, shifts[0], axis=-1)
    if permute_prob > 0:
        perm = jax.random.permutation(k_perm, d)
        x_CMD = jnp.where(jax.random.bernoulli(k_flag, permute_prob), x_CMD[..., perm], x_CMD)
    if noise_max > 0:
        sigma = jax.random.uniform(k_sigma, (), maxval=noise_max)
        x_CMD = x_CMD + sigma * jax.random.normal(k_noise, x_CMD.shape)
    return x_CMD


def class_subset_task_fn(x: np.ndarray, y: np.ndarray, config: TaskConfig = TaskConfig(), *,
                         permute_prob: float = 0.0, noise_max: float = 0.0, max_shift: int = 0,
                         image_shape: Optional[tuple[int, int]] = None, name: str = "data") -> TaskFn:
    """Tasks drawn from a labelled dataset: a random subset of its classes, disjoint examples per role.

    Args:
      x: inputs ``(n, D)``; y: integer labels ``(n,)``.
      config: task sizes; every class needs ``unlabelled + shots + queries`` examples.
      permute_prob: probability that a task permutes the input features (one permutation per task).
      noise_max: per task, Gaussian noise of a spread drawn uniformly in ``[0, noise_max]``.
      max_shift: per task, a cyclic shift by up to this many pixels each way (``image_shape`` given) or
        features (otherwise).
      image_shape: ``(H, W)`` with ``H * W == D`` to shift as images.
      name: the dataset's name, for error messages.

    Returns:
      ``sample(key) -> Task`` (classes relabelled ``0..C-1`` in the order drawn).

    Raises:
      ConfigError: too few classes or too few examples of a class for ``config``, bad augmentation settings.

    Example:
      >>> data = trainstep.load_digits()
      >>> sample = class_subset_task_fn(data.x_train, data.y_train, TaskConfig(), max_shift=1, image_shape=(8, 8))
      >>> tasks = jax.vmap(sample)(jax.random.split(key, 8))    # a batch of 8 tasks
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ConfigError(f"{name}: expected x (n, D) and y (n,), got {x.shape} and {y.shape}")
    if not np.all(np.isfinite(x)):
        raise ConfigError(f"{name}: x contains NaN or inf")
    classes = np.unique(y)
    if len(classes) < config.num_classes:
        raise ConfigError(f"{name}: has {len(classes)} classes, fewer than TaskConfig.num_classes="
                          f"{config.num_classes}")
    counts = [int(np.sum(y == c)) for c in classes]
    m = min(counts)
    if m < config.per_class:
        raise ConfigError(f"{name}: class {classes[int(np.argmin(counts))]} has {m} examples but a task needs "
                          f"unlabelled + shots + queries = {config.per_class} per class")
    if not 0.0 <= permute_prob <= 1.0 or noise_max < 0 or max_shift < 0:
        raise ConfigError(f"{name}: need 0 <= permute_prob <= 1, noise_max >= 0, max_shift >= 0, got "
                          f"{permute_prob}, {noise_max}, {max_shift}")
    if image_shape is not None and int(np.prod(image_shape)) != x.shape[1]:
        raise ConfigError(f"{name}: image_shape {image_shape} does not hold {x.shape[1]} features")
    rng = np.random.default_rng(0)
    table = jnp.asarray(np.stack([rng.permutation(np.flatnonzero(y == c))[:m] for c in classes]))
    x_dev = jnp.asarray(x)
    num_all = len(classes)

    def sample(key: jax.Array) -> Task:
        k_cls, k_ex, k_aug = jax.random.split(key, 3)
        chosen = jax.random.permutation(k_cls, num_all)[:config.num_classes]

        def examples(i, c):
            order = jax.random.permutation(jax.random.fold_in(k_ex, i), m)[:config.per_class]
            return x_dev[table[c][order]]

        x_cmd = jax.vmap(examples)(jnp.arange(config.num_classes), chosen)
        x_cmd = _augment(k_aug, x_cmd, permute_prob=permute_prob, noise_max=noise_max, max_shift=max_shift,
                         image_shape=image_shape)
        return standardize_task(_split_per_class(x_cmd, config))

    return sample


def clustered_task_fn(dim: int, config: TaskConfig = TaskConfig(), *, latent_dim: int = 8,
                      spread: tuple[float, float] = (0.3, 1.0)) -> TaskFn:
    """Synthetic tasks: Gaussian clusters in a latent space, seen through a random nonlinear map.

    Per task: ``C`` centres ``N(0, I)`` in ``latent_dim`` dimensions, examples ``centre + s * N(0, I)`` with
    ``s`` uniform in ``spread``, mapped to ``dim`` features by ``tanh(z A)`` for a random ``A``.

    Example:
      >>> sample = clustered_task_fn(64)
      >>> task = sample(jax.random.key(0))
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1 or latent_dim < 1:
        raise ConfigError(f"clustered tasks need dim >= 1 and latent_dim >= 1, got {dim}, {latent_dim}")
    if not 0 < spread[0] <= spread[1]:
        raise ConfigError(f"clustered tasks need 0 < spread[0] <= spread[1], got {spread}")

    def sample(key: jax.Array) -> Task:
        k_c, k_s, k_z, k_a = jax.random.split(key, 4)
        c = config.num_classes
        centres = jax.random.normal(k_c, (c, 1, latent_dim))
        s = jax.random.uniform(k_s, (), minval=spread[0], maxval=spread[1])
        z = centres + s * jax.random.normal(k_z, (c, config.per_class, latent_dim))
        a = jax.random.normal(k_a, (latent_dim, dim)) / jnp.sqrt(latent_dim)
        return standardize_task(_split_per_class(jnp.tanh(z @ a), config))

    return sample


def mixture_task_fn(samplers: Sequence[TaskFn], weights: Optional[Sequence[float]] = None) -> TaskFn:
    """Draws each task from one of ``samplers`` (chosen with probabilities ``weights``, uniform by default).

    Raises:
      ConfigError: no samplers, bad weights, or samplers whose tasks differ in shape.
    """
    samplers = list(samplers)
    if not samplers:
        raise ConfigError("mixture_task_fn needs at least one sampler")
    weights = np.ones(len(samplers)) if weights is None else np.asarray(weights, np.float64)
    if weights.shape != (len(samplers),) or np.any(weights < 0) or weights.sum() <= 0:
        raise ConfigError(f"mixture weights must be {len(samplers)} non-negative numbers, not all zero")
    shapes = [jax.eval_shape(s, jax.random.key(0)) for s in samplers]
    if any(sh != shapes[0] for sh in shapes[1:]):
        raise ConfigError(f"every sampler of a mixture must give tasks of one shape, got {shapes}")
    logits = jnp.asarray(np.log(np.maximum(weights / weights.sum(), 1e-30)), jnp.float32)

    def sample(key: jax.Array) -> Task:
        k_pick, k_task = jax.random.split(key)
        return jax.lax.switch(jax.random.categorical(k_pick, logits), samplers, k_task)

    return sample


def digits_task_fn(config: TaskConfig = TaskConfig(), *, split: str = "train", augment: bool = True) -> TaskFn:
    """Tasks from scikit-learn's digits (64 features): class subsets, and with ``augment`` pixel permutations
    (probability 0.3), noise (spread up to 0.3) and shifts (up to one pixel)."""
    from trainstep.data import load_digits

    data = load_digits()
    if split == "all":
        x = np.concatenate([data.x_train, data.x_val, data.x_test])
        y = np.concatenate([data.y_train, data.y_val, data.y_test])
    elif split in ("train", "val", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    else:
        raise ConfigError(f"unknown digits split {split!r}: expected 'train', 'val', 'test' or 'all'")
    extra = dict(permute_prob=0.3, noise_max=0.3, max_shift=1, image_shape=(8, 8)) if augment else {}
    return class_subset_task_fn(x, y, config, name=f"digits/{split}", **extra)


def meta_train_task_fn(config: TaskConfig = TaskConfig(), *, clustered_weight: float = 0.3) -> TaskFn:
    """The meta-training distribution: augmented digits tasks mixed with clustered tasks of the same width."""
    return mixture_task_fn([digits_task_fn(config), clustered_task_fn(64, config)],
                           [1.0 - clustered_weight, clustered_weight])


def mnist1d_task_fn(config: TaskConfig = TaskConfig(), *, split: str = "test") -> TaskFn:
    """Held-out evaluation tasks from MNIST-1D (40 features), never seen in meta-training."""
    from trainstep.data import load_mnist1d

    data = load_mnist1d(val_fraction=0.0)
    if split not in ("train", "test"):
        raise ConfigError(f"unknown mnist1d split {split!r}: expected 'train' or 'test'")
    return class_subset_task_fn(getattr(data, f"x_{split}"), getattr(data, f"y_{split}"), config,
                                name=f"mnist1d/{split}")
