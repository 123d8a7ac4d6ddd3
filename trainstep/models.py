"""Small flax models and the supervised losses built on them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

PyTree = Any


class MLP(nn.Module):
    """Fully connected classifier; ``hidden=()`` gives multinomial logistic regression."""

    hidden: Sequence[int]
    num_outputs: int
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = self.activation(nn.Dense(width)(x))
        return nn.Dense(self.num_outputs)(x)


MODELS = {"linear": (), "mlp": (100, 100)}


def make_classifier(name: str, num_classes: int) -> MLP:
    """``'linear'`` (logistic regression) or ``'mlp'`` (two hidden layers of 100 ReLU units, the
    MNIST-1D reference MLP)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {sorted(MODELS)}")
    return MLP(hidden=MODELS[name], num_outputs=num_classes)


def classification_loss(apply_fn: Callable[[PyTree, jax.Array], jax.Array]):
    """A ``loss_fn(params, batch, hparams, key)`` for :func:`trainstep.gradient_step`.

    Mean softmax cross-entropy plus ``hparams["l2"] / 2 * |params|^2`` when ``hparams`` has an
    ``"l2"`` entry; ``batch = (x, y)`` with integer labels. Aux: ``accuracy``.
    """

    def loss_fn(params, batch, hparams, key):
        del key
        x, y = batch
        logits = apply_fn(params, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        acc = jnp.mean(jnp.argmax(logits, -1) == y)
        if isinstance(hparams, dict) and "l2" in hparams:
            sq = sum(jnp.sum(p ** 2) for p in jax.tree.leaves(params))
            loss = loss + 0.5 * hparams["l2"] * sq
        return loss, {"accuracy": acc}

    return loss_fn


def evaluate_classifier(apply_fn, params, x, y) -> dict:
    """Cross-entropy and accuracy of a classifier on a whole split."""
    logits = apply_fn(params, x)
    return {
        "loss": optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
    }
