"""Run a module as ``python -m MODULE ARGS`` and report this process's peak RSS on stderr (for bench.py)."""

import resource
import runpy
import sys


def main() -> None:
    module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
    status = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    print(f"MEDAUTOLABEL_BENCH_MAXRSS_KB {peak_kb}", file=sys.stderr, flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
