"""Experiments behind ``make reproduce``: configurations, runs, tables and plots.

Kept apart from the library packages (which never import it). Each experiment module exposes
``run(out_dir, scale) -> Section``; :mod:`experiments.registry` lists them in report order.
"""
