"""Benchmarks of the library: ratios measured side by side in one run, printed next to targets.

Run every benchmark with ``python -m benchmarks`` (``--quick`` for fewer repeats). Each module
``benchmarks/bench_*.py`` exposes ``main(quick: bool) -> list[Result]``; :mod:`benchmarks.__main__`
discovers and runs them all, then prints a summary table. Benchmarks are measurements, not tests:
a missed target is printed as ``FAIL`` but does not change the exit status.

Shared helpers live here:

* :class:`Result` - one row of the summary (a measured ratio against an upper-bound target).
* :func:`time_interleaved` - interleaved wall-clock timing of jitted functions (medians).
* :func:`compiled_peak_bytes` - peak memory of a jitted function from XLA's compiled memory
  analysis (works on CPU, where ``device.memory_stats()`` is ``None``).
* :func:`print_table` - a plain-text table.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax

__all__ = ["Result", "Timings", "time_interleaved", "compiled_peak_bytes", "format_table", "print_table",
           "result_rows", "fmt_bytes", "fmt_seconds"]


@dataclasses.dataclass
class Result:
    """One summary row: ``measured`` is a ratio whose ``target`` is an upper bound (``<=``)."""

    name: str
    measured: float
    target: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.measured <= self.target


@dataclasses.dataclass
class Timings:
    """Per-call wall-clock samples (seconds) of several functions timed in interleaved rounds."""

    samples: dict  # name -> list of per-call seconds, one per round
    numbers: dict  # name -> calls averaged into each sample

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, a: str, b: str) -> float:
        """Ratio of the medians, ``median(a) / median(b)`` (the headline statistic)."""
        return self.median(a) / self.median(b)

    def paired_ratio(self, a: str, b: str) -> float:
        """Median over rounds of ``a / b`` within the same round (robust to slow load drift)."""
        return statistics.median(x / y for x, y in zip(self.samples[a], self.samples[b], strict=True))

    def table(self, baseline: Optional[str] = None) -> str:
        header = ["function", "median", "min", "max", "rounds x calls"]
        if baseline is not None:
            header += ["ratio (medians)", "ratio (paired)"]
        rows = []
        for name, s in self.samples.items():
            row = [name, fmt_seconds(statistics.median(s)), fmt_seconds(min(s)), fmt_seconds(max(s)),
                   f"{len(s)} x {self.numbers[name]}"]
            if baseline is not None:
                row += [f"{self.ratio(name, baseline):.3f}", f"{self.paired_ratio(name, baseline):.3f}"]
            rows.append(row)
        title = None
        if baseline is not None:
            title = (f"ratios against '{baseline}': of the medians (headline), and the median over rounds of the "
                     "ratio within a round")
        return format_table(header, rows, title=title)


def fmt_seconds(t: float) -> str:
    if t >= 1.0:
        return f"{t:.3f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} us"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _call(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / number


def time_interleaved(fns: dict, *, rounds: int = 7, min_sample_s: float = 0.1, warmup: int = 2) -> Timings:
    """Times zero-argument functions (closures over jitted calls) side by side.

    Every function is first called ``warmup`` times (so compilation is excluded), then all are
    timed in ``rounds`` interleaved rounds, the order rotated by one each round (A B C, B C A, ...)
    so that drift in the machine's load hits all alike. A sample is the mean time of ``number``
    back-to-back calls, ``number`` chosen per function so that a sample lasts at least
    ``min_sample_s``; the last call's result is waited on with ``jax.block_until_ready``. Compare
    the medians (:meth:`Timings.ratio`).
    """
    names = list(fns)
    numbers = {}
    for name in names:
        for _ in range(max(1, warmup)):
            t = _call(fns[name], 1)
        numbers[name] = 1 if t >= min_sample_s else int(min_sample_s / max(t, 1e-9)) + 1
    samples = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(_call(fns[name], numbers[name]))
    return Timings(samples, numbers)


def compiled_peak_bytes(fn: Callable, *args, **kwargs) -> dict:
    """Peak device memory of ``jax.jit(fn)(*args, **kwargs)`` from XLA's compiled memory analysis.

    ``device.memory_stats()`` is ``None`` on CPU, so instead of observing the allocator we ask the
    compiler: after buffer assignment (which already reuses buffers whose lifetimes do not
    overlap), ``compiled.memory_analysis()`` reports the bytes of the arguments, the outputs, the
    temporaries (one preallocated block holding every intermediate, sized for the worst point of the
    program) and the output bytes aliased onto donated arguments. The peak is

        temp_size_in_bytes + argument_size_in_bytes + output_size_in_bytes - alias_size_in_bytes

    It is a static figure, identical from run to run, for what the program holds live at its worst
    point (generated code and the runtime's own allocations are excluded). It is computed by the
    CPU compiler's buffer assignment, so on an accelerator the absolute bytes differ somewhat;
    ratios between two sizes of the same program are what the benchmarks compare.

    Returns:
      a dict with ``peak`` and its components ``temp``, ``argument``, ``output``, ``alias``.
    """
    compiled = jax.jit(fn).lower(*args, **kwargs).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError("this backend's compiled.memory_analysis() returned None")
    parts = {
        "temp": int(stats.temp_size_in_bytes),
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
    }
    parts["peak"] = parts["temp"] + parts["argument"] + parts["output"] - parts["alias"]
    return parts


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, title: Optional[str] = None) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = []
    if title:
        out.append(title)
    out.append("  ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=False)).rstrip())
    out.append(line)
    for r in cells[1:]:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
    return "\n".join(out)


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, title: Optional[str] = None) -> None:
    print(format_table(header, rows, title=title), flush=True)


def result_rows(results: Sequence[Result]) -> list:
    """Summary rows: name, measured ratio, target, pass/FAIL, detail."""
    return [[r.name, f"{r.measured:.3f}", f"<= {r.target:g}", "pass" if r.passed else "FAIL", r.detail]
            for r in results]
