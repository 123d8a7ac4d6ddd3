"""The meta-objective's few-shot readout: ridge regression from a representation to one-hot labels.

Fitted in closed form on a few labelled examples per class (the *support* set) and scored on others (the
*query* set), differentiably, so the meta-gradient flows from the score back into the representation and
through it into the rule. Metz et al. (2019) found the cosine distance between prediction and one-hot
target more stable than the squared error as a meta-objective; both are here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trainstep.runner import ConfigError

LOSSES = ("cosine", "mse")
NORM_EPS = 1e-6


def readout_features(feats_SD: jax.Array, centre_D: jax.Array) -> jax.Array:
    """Centred, unit-norm rows with a constant column appended ``(S, D + 1)``: the ridge design matrix.

    Normalising the rows makes the ridge penalty mean the same thing whatever the representation's scale.
    """
    f = feats_SD - centre_D[None, :]
    f = f / jnp.sqrt(jnp.sum(f ** 2, axis=1, keepdims=True) + NORM_EPS)
    return jnp.concatenate([f, jnp.ones((f.shape[0], 1), f.dtype)], axis=1)


def ridge_fit(design_SP: jax.Array, targets_SC: jax.Array, l2: jax.Array) -> jax.Array:
    """``argmin_W |design W - targets|^2 + l2 |W|^2`` ``(P, C)``, in the cheaper of the primal and dual forms.

    Example:
      >>> w = ridge_fit(x, jax.nn.one_hot(y, 10), 0.1)   # equals solve(xᵀx + 0.1 I, xᵀ y)
    """
    s, p = design_SP.shape
    if s < p:  # dual form: W = Xᵀ (X Xᵀ + l2 I)^-1 Y, an s x s solve
        gram = design_SP @ design_SP.T + l2 * jnp.eye(s, dtype=design_SP.dtype)
        return design_SP.T @ jnp.linalg.solve(gram, targets_SC)
    gram = design_SP.T @ design_SP + l2 * jnp.eye(p, dtype=design_SP.dtype)
    return jnp.linalg.solve(gram, design_SP.T @ targets_SC)


def few_shot_ridge_loss(feats_support: jax.Array, y_support: jax.Array, feats_query: jax.Array,
                        y_query: jax.Array, num_classes: int, *, l2: float | jax.Array = 0.1,
                        loss: str = "cosine") -> tuple[jax.Array, jax.Array]:
    """Fits a ridge readout on the support set and scores it on the query set.

    Args:
      feats_support: representation of the support examples ``(S, D)``.
      y_support: their integer labels ``(S,)`` in ``[0, num_classes)``.
      feats_query, y_query: the query examples ``(Q, D)`` and labels ``(Q,)``.
      num_classes: number of classes (static).
      l2: ridge penalty (an array leaf is fine: differentiable).
      loss: ``"cosine"`` (mean ``1 - cos(prediction, one-hot)``) or ``"mse"`` (mean squared error per
        example, summed over classes).

    Returns:
      ``(loss, accuracy)`` on the query set.

    Example:
      >>> loss, acc = few_shot_ridge_loss(f[:50], y[:50], f[50:], y[50:], 5)
    """
    if loss not in LOSSES:
        raise ConfigError(f"unknown readout loss {loss!r}: expected one of {list(LOSSES)}")
    centre = jnp.mean(feats_support, axis=0)
    w = ridge_fit(readout_features(feats_support, centre), jax.nn.one_hot(y_support, num_classes), l2)
    pred = readout_features(feats_query, centre) @ w
    target = jax.nn.one_hot(y_query, num_classes)
    if loss == "cosine":
        cos = jnp.sum(pred * target, axis=1) / jnp.sqrt(jnp.sum(pred ** 2, axis=1) + NORM_EPS)
        value = jnp.mean(1.0 - cos)
    else:
        value = jnp.mean(jnp.sum((pred - target) ** 2, axis=1))
    accuracy = jnp.mean((jnp.argmax(pred, axis=1) == y_query).astype(jnp.float32))
    return value, accuracy


def few_shot_ridge_accuracy(feats_support, y_support, feats_query, y_query, num_classes: int, *,
                            l2: float = 0.1) -> jax.Array:
    """Query accuracy of the ridge readout fitted on the support set (see :func:`few_shot_ridge_loss`)."""
    return few_shot_ridge_loss(feats_support, y_support, feats_query, y_query, num_classes, l2=l2)[1]
