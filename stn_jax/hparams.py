"""Hyperparameters of a Self-Tuning Network: declarations, constraints, perturbation, entropy.

Every hyperparameter lives in an *unconstrained* space where the hypernetwork sees it and where
gradient descent moves it; a constraint maps it to the value used by the model:

* ``range`` ``(low, high)``: ``low + (high - low) * sigmoid(u)``;
* ``positive`` (softplus): ``softplus(u)``, or ``exp(u)`` with ``constraint="log"``;
* ``real``: the identity.

During weight steps each example (or each batch, for hyperparameters such as weight decay that
act on the whole batch) draws ``u~ = u + sigma * eps``, ``eps ~ N(0, 1)``, with a learned scale
``sigma = softplus(s)``; the hyper step adds ``-tau * entropy`` (``sum log sigma`` up to a constant)
so that the scale does not collapse. A *discrete* hyperparameter keeps a continuous value for the
hypernetwork and is rounded only where it is used (:meth:`HParamSpace.values` with ``round=True``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp

from trainstep.runner import ConfigError

CONSTRAINTS = ("range", "positive", "log", "real")
PERTURBATIONS = ("example", "batch")


class HParamError(ConfigError):
    """An invalid hyperparameter declaration (a ``ConfigError``: exit code 2 from the CLI)."""


def _softplus_inv(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


@dataclasses.dataclass(frozen=True)
class HParam:
    """One tunable hyperparameter.

    Attributes:
      name: unique name, used as the key of :meth:`HParamSpace.values`.
      init: initial value in the constrained space.
      constraint: ``"range"`` (needs ``low < high``), ``"positive"`` (softplus), ``"log"`` (exp) or
        ``"real"``.
      low, high: the bounds of a ``range``.
      perturb: ``"example"`` (each example its own draw, e.g. dropout rates) or ``"batch"`` (one
        draw shared by the minibatch, e.g. weight decay).
      discrete: round the value where it is used (the hypernetwork sees the continuous value).
      init_scale: initial perturbation scale ``sigma`` in the unconstrained space.
    """

    name: str
    init: float
    constraint: str = "range"
    low: Optional[float] = None
    high: Optional[float] = None
    perturb: str = "example"
    discrete: bool = False
    init_scale: float = 0.5

    def __post_init__(self):
        where = f"hyperparameter {self.name!r}"
        if not self.name or not isinstance(self.name, str):
            raise HParamError(f"a hyperparameter needs a non-empty name, got {self.name!r}")
        if self.constraint not in CONSTRAINTS:
            raise HParamError(f"{where}: unknown constraint {self.constraint!r}; valid: {', '.join(CONSTRAINTS)}")
        if self.perturb not in PERTURBATIONS:
            raise HParamError(f"{where}: perturb must be one of {', '.join(PERTURBATIONS)}, got {self.perturb!r}")
        if not math.isfinite(self.init):
            raise HParamError(f"{where}: initial value must be finite, got {self.init}")
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise HParamError(f"{where}: init_scale must be > 0, got {self.init_scale}")
        if self.constraint == "range":
            if self.low is None or self.high is None:
                raise HParamError(f"{where}: a range needs low and high")
            if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
                raise HParamError(f"{where}: needs low < high, got low={self.low}, high={self.high}")
            if not self.low < self.init < self.high:
                raise HParamError(f"{where}: initial value {self.init} is outside the open range "
                                  f"({self.low}, {self.high})")
        elif self.low is not None or self.high is not None:
            raise HParamError(f"{where}: low/high only apply to constraint='range'")
        if self.constraint in ("positive", "log") and not self.init > 0:
            raise HParamError(f"{where}: a positive hyperparameter needs init > 0, got {self.init}")

    def to_unconstrained(self, value: float) -> float:
        """Python-side inverse of :meth:`constrain` (for declarations and grids)."""
        if self.constraint == "range":
            if not self.low < value < self.high:
                raise HParamError(f"hyperparameter {self.name!r}: {value} is outside ({self.low}, {self.high})")
            return _logit((value - self.low) / (self.high - self.low))
        if self.constraint == "positive":
            if not value > 0:
                raise HParamError(f"hyperparameter {self.name!r}: {value} is not > 0")
            return _softplus_inv(value)
        if self.constraint == "log":
            if not value > 0:
                raise HParamError(f"hyperparameter {self.name!r}: {value} is not > 0")
            return math.log(value)
        return float(value)

    def constrain(self, u: jax.Array) -> jax.Array:
        """Unconstrained ``u`` (any shape) to the hyperparameter's value."""
        if self.constraint == "range":
            return self.low + (self.high - self.low) * jax.nn.sigmoid(u)
        if self.constraint == "positive":
            return jax.nn.softplus(u)
        if self.constraint == "log":
            return jnp.exp(u)
        return u


@dataclasses.dataclass(frozen=True)
class HParamSpace:
    """An ordered set of hyperparameters; the hypernetwork sees them as one vector."""

    hparams: tuple[HParam, ...]

    def __init__(self, hparams: Sequence[HParam]):
        hparams = tuple(hparams)
        if not hparams:
            raise HParamError("declare at least one hyperparameter")
        names = [h.name for h in hparams]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise HParamError(f"duplicate hyperparameter names: {dup}")
        object.__setattr__(self, "hparams", hparams)

    def __len__(self) -> int:
        return len(self.hparams)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hparams)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no hyperparameter {name!r}; declared: {list(self.names)}") from None

    def init_unconstrained(self) -> jax.Array:
        """The declared initial values, unconstrained, as a vector of length ``len(self)``."""
        return jnp.asarray([h.to_unconstrained(h.init) for h in self.hparams], jnp.float32)

    def init_scale_param(self) -> jax.Array:
        """``s`` with ``softplus(s)`` equal to each declared ``init_scale``."""
        return jnp.asarray([_softplus_inv(h.init_scale) for h in self.hparams], jnp.float32)

    def unconstrained(self, values: dict) -> jax.Array:
        """A dict of constrained values (Python floats) to the unconstrained vector."""
        missing = set(self.names) - set(values)
        if missing:
            raise HParamError(f"missing values for {sorted(missing)}")
        return jnp.asarray([h.to_unconstrained(float(values[h.name])) for h in self.hparams], jnp.float32)

    def constrain(self, u: jax.Array, *, round_discrete: bool = False) -> dict:
        """Unconstrained ``u`` of shape ``(..., len(self))`` to ``{name: value of shape (...)}``.

        With ``round_discrete`` the discrete hyperparameters are rounded (straight-through: the
        rounding carries no gradient, the value does)."""
        u = jnp.asarray(u)
        if u.shape[-1:] != (len(self),):
            raise ValueError(f"expected a trailing axis of {len(self)} hyperparameters, got shape {u.shape}")
        out = {}
        for i, h in enumerate(self.hparams):
            v = h.constrain(u[..., i])
            if round_discrete and h.discrete:
                v = v + jax.lax.stop_gradient(jnp.round(v) - v)
            out[h.name] = v
        return out

    def values(self, u: jax.Array) -> dict:
        """Python floats of the constrained values of an unconstrained vector (for logs)."""
        return {k: float(v) for k, v in self.constrain(u).items()}

    def perturb(self, key: jax.Array, u: jax.Array, scale: jax.Array, batch_size: int) -> jax.Array:
        """Per-example draws ``u + sigma * eps`` of shape ``(batch_size, len(self))``.

        ``sigma = softplus(scale)``. Hyperparameters declared ``perturb="batch"`` share one draw
        across the batch."""
        # Explicit leading axes: the library runs under jax_numpy_rank_promotion="raise".
        sigma = jax.nn.softplus(scale)[None, :]
        k1, k2 = jax.random.split(key)
        eps_example = jax.random.normal(k1, (batch_size, len(self)), u.dtype)
        eps_batch = jnp.broadcast_to(jax.random.normal(k2, (1, len(self)), u.dtype), eps_example.shape)
        per_batch = jnp.asarray([[h.perturb == "batch" for h in self.hparams]])
        eps = jnp.where(per_batch, eps_batch, eps_example)
        return u[None, :] + sigma * eps

    @staticmethod
    def entropy(scale: jax.Array) -> jax.Array:
        """Entropy of ``N(u, diag(sigma^2))``, ``sigma = softplus(scale)``: ``sum log sigma`` plus
        ``n/2 log(2 pi e)``."""
        sigma = jax.nn.softplus(scale)
        n = sigma.shape[-1]
        return jnp.sum(jnp.log(sigma), axis=-1) + 0.5 * n * math.log(2 * math.pi * math.e)
