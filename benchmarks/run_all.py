"""Run every `benchmarks/bench_*.py` module in turn: `python -m benchmarks.run_all`.

Each module runs in its own interpreter (`python -m benchmarks.<name>`) so one
benchmark's memory and threads do not skew the next. Extra arguments are not
passed on; run a module directly to tune it.
"""

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def bench_modules() -> list[str]:
    """Names of the benchmark modules found beside this file, sorted."""
    return sorted(path.stem for path in HERE.glob("bench_*.py"))


def main() -> int:
    """Run each module; return 1 if any failed, after running all of them."""
    failed = []
    for name in bench_modules():
        print(f"== benchmarks.{name}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{name}"],
            cwd=HERE.parent,
            check=False,
        )
        took = time.perf_counter() - start
        status = "ok" if done.returncode == 0 else f"FAILED ({done.returncode})"
        print(f"== benchmarks.{name}: {status} in {took:.0f} s", flush=True)
        if done.returncode != 0:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
