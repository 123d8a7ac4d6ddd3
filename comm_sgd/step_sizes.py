"""Step sizes of the two papers as optax schedules, and the output (averaged) iterate.

* Stich (2019): ``eta_t = 4 / (mu * (a + t))`` with a shift ``a > max(16 kappa, H)``, output the
  average of the iterates with weights ``(a + t)**2``.
* Patel & Dieuleveut (2019): large steps ``gamma_t = c * t**(-alpha)``, ``alpha`` in (1/2, 1), with
  the Polyak-Ruppert (uniform) average of the iterates.

Steps are counted from ``t = 0`` by optax; the polynomial schedule uses ``c * (t + 1)**(-alpha)``
so that its first step is ``c``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

from trainstep.runner import ConfigError

LR_FORMS = ("stich", "poly:c:alpha", "const:c")
AVERAGES = ("last", "uniform", "stich")


def stich_step_size(mu: float, a: float) -> optax.Schedule:
    """``eta_t = 4 / (mu * (a + t))`` (Stich 2019, Theorem 2.2)."""
    if not (mu > 0 and a > 0):
        raise ConfigError(f"the Stich step size needs mu > 0 and a > 0, got mu={mu}, a={a}")
    return lambda t: 4.0 / (mu * (a + jnp.asarray(t, jnp.float32)))


def polynomial_step_size(c: float, alpha: float) -> optax.Schedule:
    """``gamma_t = c * (t + 1)**(-alpha)`` (Patel & Dieuleveut's large steps for ``alpha < 1``)."""
    if not (c > 0 and 0 <= alpha <= 1):
        raise ConfigError(f"the polynomial step size needs c > 0 and 0 <= alpha <= 1, got c={c}, alpha={alpha}")
    return lambda t: c * (jnp.asarray(t, jnp.float32) + 1.0) ** (-alpha)


def stich_shift(kappa: float, period: int) -> float:
    """Stich's smallest admissible shift, ``a = max(16 kappa, H) + 1``."""
    return float(max(16.0 * kappa, period) + 1.0)


def parse_step_size(spec: str, *, mu: float, a: float) -> optax.Schedule:
    """``stich`` (uses ``mu`` and ``a``), ``poly:c:alpha`` or ``const:c``.

    Raises:
      ConfigError: for a malformed spec (the message lists the valid forms).
    """
    parts = spec.strip().lower().split(":")
    try:
        if parts == ["stich"]:
            return stich_step_size(mu, a)
        if parts[0] == "poly" and len(parts) == 3:
            return polynomial_step_size(float(parts[1]), float(parts[2]))
        if parts[0] == "const" and len(parts) == 2:
            c = float(parts[1])
            if not (math.isfinite(c) and c > 0):
                raise ConfigError(f"a constant step size must be finite and > 0, got {c}")
            return optax.constant_schedule(c)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot read step size {spec!r} ({e}); valid forms: {', '.join(LR_FORMS)}") from None
    raise ConfigError(f"cannot read step size {spec!r}; valid forms: {', '.join(LR_FORMS)}")


class IterateAverage(NamedTuple):
    """Running weighted average of the iterates ``x_1, ..., x_t`` (a pytree like the params)."""

    params: object
    weight: jax.Array  # sum of the weights so far (float32)


def iterate_weight(kind: str, t: Union[int, jax.Array], shift: float = 1.0) -> jax.Array:
    """Weight of the iterate reached after ``t + 1`` steps: 0/1 for ``last`` (only the latest
    counts), 1 for ``uniform`` and ``(shift + t)**2`` for ``stich``."""
    t = jnp.asarray(t, jnp.float32)
    if kind == "uniform" or kind == "last":
        return jnp.ones_like(t)
    if kind == "stich":
        return (shift + t) ** 2
    raise ConfigError(f"unknown output average {kind!r}; valid: {', '.join(AVERAGES)}")


def init_average(params) -> IterateAverage:
    return IterateAverage(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))


def update_average(avg: IterateAverage, params, kind: str, t, shift: float = 1.0) -> IterateAverage:
    """Adds the iterate ``params`` (reached after step ``t``) to the running average.

    Uses ``avg += (w / W) * (x - avg)``, stable for the growing Stich weights. ``last`` keeps the
    latest iterate only.
    """
    if kind == "last":
        return IterateAverage(params, avg.weight + 1.0)
    w = iterate_weight(kind, t, shift)
    total = avg.weight + w
    frac = w / total
    # The barrier keeps the product out of the addition's fusion: XLA:CPU may otherwise contract
    # them into a fused multiply-add or not depending on the array shapes, and the simulation
    # (stacked workers) and the mesh (one worker per device) would round differently.
    steps = lax.optimization_barrier(jax.tree.map(lambda a, x: (frac * (x - a)).astype(a.dtype), avg.params, params))
    new = jax.tree.map(lambda a, d: a + d, avg.params, steps)
    return IterateAverage(new, total)
