"""Small helpers shared by the experiments: tables, mean ± std, plots."""

from __future__ import annotations

import numpy as np


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt_pm(values, scale: float = 1.0, digits: int = 1) -> str:
    m, s = mean_std(np.asarray(values) * scale)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
