"""``python -m benchmarks [--quick] [--only SUBSTRING]``: runs every ``benchmarks/bench_*.py``.

Each module exposes ``main(quick: bool) -> list[benchmarks.Result]``. Modules are run in name
order; a summary table (name, measured ratio, target, pass/FAIL) ends the output. A missed target
does not change the exit status (benchmarks measure, they do not test); a benchmark that raises
is reported as ERROR and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import platform
import sys
import time
import traceback

import jax

import benchmarks
from benchmarks import Result, print_table, result_rows


def discover() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__)
                  if m.name.startswith("bench_") and not m.ispkg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a rough, faster measurement)")
    parser.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                        help="run only the modules whose name contains SUBSTRING (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the benchmark modules and exit")
    args = parser.parse_args(argv)

    names = discover()
    if args.only:
        names = [n for n in names if any(s in n for s in args.only)]
    if args.list:
        print("\n".join(names))
        return 0
    if not names:
        print("no benchmark modules matched", file=sys.stderr)
        return 1

    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), {jax.device_count()} device(s); "
          f"python {platform.python_version()}; quick={args.quick}", flush=True)
    start = time.perf_counter()
    results: list[Result] = []
    errors: list[str] = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            results.extend(module.main(quick=args.quick))
        except Exception:  # report and go on with the other modules
            traceback.print_exc()
            errors.append(name)
        print(f"({name}: {time.perf_counter() - t0:.1f} s)", flush=True)

    print(f"\n=== summary ({time.perf_counter() - start:.1f} s) ===")
    rows = result_rows(results) + [[f"{n} (module)", "-", "-", "ERROR", "raised, see above"] for n in errors]
    print_table(["benchmark", "measured", "target", "result", "detail"], rows)
    failed = [r.name for r in results if not r.passed]
    if failed:
        print(f"FAIL: {len(failed)} target(s) missed: {', '.join(failed)}")
    else:
        print(f"all {len(results)} targets met")
    if errors:
        print(f"ERROR: {len(errors)} module(s) raised: {', '.join(errors)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
