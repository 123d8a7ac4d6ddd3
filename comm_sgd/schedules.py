"""Communication schedules for local SGD: *when* the workers average their parameters.

A schedule is turned into a boolean mask over the ``T`` local steps of a run: ``mask[t]`` is true
when the workers average right after their ``t``-th step (0-based), so the number of
communications is ``mask.sum()``. Every schedule ends with an average after the last step, so the
run always returns one model (``once`` is therefore one-shot averaging: one communication).

String forms (for command lines), see :func:`parse_schedule`:

==========================  ==================================================================
``every``                   average after every step (mini-batch SGD with batch ``K * b``)
``fixed:H``                 every ``H`` steps (Stich's local SGD)
``post-local:W:H``          every step during ``W`` warm-up steps, then every ``H`` (Lin et al.)
``increasing:c[:p]``        the ``k``-th period has ``ceil(c * k**p)`` local steps (``p = 1`` by
                            default): Patel & Dieuleveut's adaptive schedule, about
                            ``sqrt(2 T / c)`` communications for ``p = 1``
``once``                    one-shot averaging: only after the last step
``steps:s1,s2,...``         after the listed step counts (1-based: ``steps:10`` averages once
                            10 steps are done), plus the last step
==========================  ==================================================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from trainstep.runner import ConfigError

VALID_FORMS = (
    "every",
    "fixed:H",
    "post-local:W:H",
    "increasing:c[:p]",
    "once",
    "steps:s1,s2,...",
)


class ScheduleError(ConfigError):
    """A malformed or impossible communication schedule (a :class:`ConfigError`: CLI exit code 2)."""

    def __init__(self, message: str):
        super().__init__(f"{message}; valid schedules: {', '.join(VALID_FORMS)}")


def _exact(x: float) -> str:
    """Shortest decimal that reads back as exactly ``x`` (``:g`` rounds to 6 digits, which moves an
    ``increasing_for`` schedule, found right at a count's boundary, to another count)."""
    s = repr(float(x))
    return s[:-2] if s.endswith(".0") else s


@dataclasses.dataclass(frozen=True)
class SyncSchedule:
    """A communication schedule.

    Attributes:
      kind: ``"every"``, ``"fixed"``, ``"post-local"``, ``"increasing"``, ``"once"`` or ``"steps"``.
      period: ``H`` for ``fixed`` and ``post-local``.
      warmup: ``W`` for ``post-local``.
      c, p: growth of ``increasing`` periods, ``ceil(c * k**p)``.
      steps: the explicit step counts of ``steps``.
    """

    kind: str
    period: int = 1
    warmup: int = 0
    c: float = 1.0
    p: float = 1.0
    steps: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in ("every", "fixed", "post-local", "increasing", "once", "steps"):
            raise ScheduleError(f"unknown schedule kind {self.kind!r}")
        if self.period < 1:
            raise ScheduleError(f"the period H must be >= 1, got {self.period}")
        if self.warmup < 0:
            raise ScheduleError(f"the warm-up W must be >= 0, got {self.warmup}")
        if not (math.isfinite(self.c) and self.c > 0):
            raise ScheduleError(f"increasing needs c > 0, got {self.c}")
        if not (math.isfinite(self.p) and self.p >= 0):
            raise ScheduleError(f"increasing needs p >= 0, got {self.p}")
        if any(s < 1 for s in self.steps):
            raise ScheduleError(f"explicit steps must be >= 1, got {list(self.steps)}")

    @property
    def spec(self) -> str:
        """The string form, which :func:`parse_schedule` reads back."""
        if self.kind == "fixed":
            return f"fixed:{self.period}"
        if self.kind == "post-local":
            return f"post-local:{self.warmup}:{self.period}"
        if self.kind == "increasing":
            return f"increasing:{_exact(self.c)}" + ("" if self.p == 1 else f":{_exact(self.p)}")
        if self.kind == "steps":
            return "steps:" + ",".join(str(s) for s in self.steps)
        return self.kind

    def __str__(self) -> str:
        return self.spec

    def mask(self, num_steps: int) -> np.ndarray:
        """Boolean array of length ``num_steps``: average after step ``t`` (0-based) where true."""
        if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise ScheduleError(f"the number of steps must be a positive int, got {num_steps!r}")
        done = np.arange(1, num_steps + 1)  # steps done after step t
        if self.kind == "every":
            m = np.ones(num_steps, bool)
        elif self.kind == "fixed":
            m = done % self.period == 0
        elif self.kind == "post-local":
            m = (done <= self.warmup) | ((done - self.warmup) % self.period == 0)
        elif self.kind == "increasing":
            m = np.zeros(num_steps, bool)
            s, k = 0, 1
            while True:
                s += max(1, math.ceil(self.c * k ** self.p - 1e-9))
                if s > num_steps:
                    break
                m[s - 1] = True
                k += 1
        elif self.kind == "once":
            m = np.zeros(num_steps, bool)
        else:
            m = np.zeros(num_steps, bool)
            for s in self.steps:
                if s <= num_steps:
                    m[s - 1] = True
        m[-1] = True
        return m

    def num_communications(self, num_steps: int) -> int:
        """Number of averaging rounds in a run of ``num_steps`` local steps."""
        return int(self.mask(num_steps).sum())


def every() -> SyncSchedule:
    """Average after every step (mini-batch averaging)."""
    return SyncSchedule("every")


def fixed(period: int) -> SyncSchedule:
    """Average every ``period`` local steps."""
    return SyncSchedule("fixed", period=int(period))


def post_local(warmup: int, period: int) -> SyncSchedule:
    """Average every step for ``warmup`` steps, then every ``period`` steps."""
    return SyncSchedule("post-local", period=int(period), warmup=int(warmup))


def increasing(c: float, p: float = 1.0) -> SyncSchedule:
    """Periods ``ceil(c * k**p)``, ``k = 1, 2, ...`` (growing communication intervals)."""
    return SyncSchedule("increasing", c=float(c), p=float(p))


def once() -> SyncSchedule:
    """One-shot averaging: the workers communicate only after their last step."""
    return SyncSchedule("once")


def at_steps(steps: Sequence[int]) -> SyncSchedule:
    """Average after the listed step counts (1-based) and after the last step."""
    return SyncSchedule("steps", steps=tuple(sorted({int(s) for s in steps})))


def increasing_for(num_communications: int, num_steps: int, p: float = 1.0) -> SyncSchedule:
    """The ``increasing`` schedule (exponent ``p``) whose run of ``num_steps`` has about
    ``num_communications`` rounds, found by bisection on ``c``."""
    if num_communications < 1:
        raise ScheduleError(f"num_communications must be >= 1, got {num_communications}")
    def count(c):
        return increasing(c, p).num_communications(num_steps)

    lo, hi = 1e-6, float(num_steps) + 1.0
    for _ in range(60):  # smallest c with at most num_communications rounds
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if count(mid) > num_communications else (lo, mid)
    target = count(hi)
    top_lo, top_hi = hi, float(num_steps) + 1.0
    for _ in range(60):  # largest c with the same count
        mid = math.sqrt(top_lo * top_hi)
        top_lo, top_hi = (mid, top_hi) if count(mid) == target else (top_lo, mid)
    # A round c from the middle of the interval, away from its edges.
    mid = math.sqrt(hi * top_lo)
    for digits in range(2, 12):
        c = float(f"{mid:.{digits}g}")
        if hi <= c <= top_lo and count(c) == target:
            return increasing(c, p)
    return increasing(mid, p)


def _int(text: str, what: str, spec: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ScheduleError(f"{what} in schedule {spec!r} must be an integer, got {text!r}") from None
    return v


def _num(text: str, what: str, spec: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ScheduleError(f"{what} in schedule {spec!r} must be a number, got {text!r}") from None
    return v


def parse_schedule(spec: str | SyncSchedule) -> SyncSchedule:
    """Reads a schedule from its string form (see the module docstring).

    Raises:
      ScheduleError: for a malformed spec; the message lists the valid forms.
    """
    if isinstance(spec, SyncSchedule):
        return spec
    if not isinstance(spec, str):
        raise ScheduleError(f"a schedule must be a string, got {type(spec).__name__}")
    text = spec.strip().lower()
    kind, _, rest = text.partition(":")
    parts = rest.split(":") if rest else []
    if kind in ("every", "once"):
        if parts:
            raise ScheduleError(f"{kind!r} takes no arguments, got {spec!r}")
        return SyncSchedule(kind)
    if kind == "fixed" and len(parts) == 1:
        return fixed(_int(parts[0], "H", spec))
    if kind == "post-local" and len(parts) == 2:
        return post_local(_int(parts[0], "W", spec), _int(parts[1], "H", spec))
    if kind == "increasing" and len(parts) in (1, 2):
        c = _num(parts[0], "c", spec)
        p = _num(parts[1], "p", spec) if len(parts) == 2 else 1.0
        return increasing(c, p)
    if kind == "steps" and len(parts) == 1 and parts[0]:
        return at_steps([_int(s, "a step", spec) for s in parts[0].split(",")])
    raise ScheduleError(f"cannot read schedule {spec!r}")
