"""Run a module as ``python -m MODULE ARGS`` and report this process's peak RSS on stderr (for bench.py)."""

import resource
import runpy
import sys


def peak_rss_kb() -> int:
    """This process's peak resident set since it started, in kB.

    On Linux ``ru_maxrss`` survives ``execve`` and, when the process was started with ``vfork``
    (as Python's subprocess does), starts from the *parent's* peak: a benchmark parent that once
    held 8 GB would make every later child report 8 GB. ``VmHWM`` belongs to this process's own
    address space, so it counts only what it used; the largest child process is added as a
    floor (a runner's worker processes count too).
    """
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):  # not Linux: the portable figure
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(hwm, children)


def main() -> None:
    module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
    status = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    print(f"MEDAUTOLABEL_BENCH_MAXRSS_KB {peak_rss_kb()}", file=sys.stderr, flush=True)
    sys.exit(status)


if __name__ == "__main__":
    main()
