"""Run every benchmark in this folder (or the ones named) in turn and print their output.

    python benchmarks/run.py                 # all benchmarks/*.py except this file
    python benchmarks/run.py pq_eval         # just these (with or without .py)
    python benchmarks/run.py pq_eval -- --images 100   # arguments after -- go to each benchmark

Exits non-zero if any benchmark does.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    if argv:
        scripts = [HERE / (name if name.endswith(".py") else f"{name}.py") for name in argv]
        unknown = [s.name for s in scripts if not s.is_file()]
        if unknown:
            print(f"unknown benchmark(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
    else:
        scripts = sorted(
            p for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_")
        )
    failed = []
    for script in scripts:
        print(f"## {script.stem}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(script), *extra])
        print(f"({script.name}: exit {code}, {time.perf_counter() - start:.1f}s)\n", flush=True)
        if code:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
