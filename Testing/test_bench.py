"""The benchmark's page: the numbers it computes from the measured runs, and the paused-training check."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Callable, Dict, List

import pytest
from bench import BENCH_CHILD, is_running_training, report, training_running

NUMBER = re.compile(r"\d+(?:\.\d+)?")


def fake_result(monai_s=(100.0, 120.0, 110.0), ours_s=(40.0, 50.0, 44.0), monai_rss=(4000.0, 4100.0, 3900.0),
                ours_rss=(1000.0, 1025.0, 990.0), dice_body=None, network_s=22.0, case="toy (UNet)") -> dict:
    """A results dict as bench_case makes it, with chosen times, peak RSS, Dice and network time."""
    return {
        "case": case,
        "runs": {"monai": [{"seconds": s, "peak_rss_mb": m} for s, m in zip(monai_s, monai_rss)],
                 "medautolabel": [{"seconds": s, "peak_rss_mb": m} for s, m in zip(ours_s, ours_rss)]},
        "dice": {"Vessel": 0.5, "Nerve": 0.95}, "dice_body": dice_body or {"Vessel": 0.995, "Nerve": 0.991},
        "outside_body": {"Vessel": 1234, "Nerve": 0}, "precision": "bfloat16",
        "our_stages_s": {"inference": network_s, "total": 40.0}, "monai_stages_s": {"inference": 60.0},
    }


def numbers(text: str) -> List[float]:
    return [float(x) for x in NUMBER.findall(text)]


def table_row(text: str, case: str) -> List[str]:
    row = next(line for line in text.splitlines() if line.startswith(f"| {case} |"))
    return [c.strip() for c in row.strip().strip("|").split("|")]


def targets(text: str, case: str) -> Dict[str, object]:
    """The case's line under 'Against the targets': each figure and whether its target was met."""
    line = next(line for line in text.splitlines() if line.startswith(f"- {case}:"))
    met = [m == "met" for m in re.findall(r"target [\d.]+x?: (met|\*\*not met\*\*)", line)]
    values = numbers(line.replace(case, ""))
    return {"met": met, "values": values}


def expected(r: dict) -> Dict[str, float]:
    """The figures the page should show, computed here independently of bench.py."""
    ta = [x["seconds"] for x in r["runs"]["monai"]]
    tb = [x["seconds"] for x in r["runs"]["medautolabel"]]
    net = r["our_stages_s"]["inference"]
    return {"speedup": median(ta) / median(tb),
            "speedups": [a / b for a, b in zip(ta, tb)],
            "rss_ratio": max(x["peak_rss_mb"] for x in r["runs"]["medautolabel"])
            / max(x["peak_rss_mb"] for x in r["runs"]["monai"]),
            "dice": min(r["dice_body"].values()), "e2e": median(tb) / net, "bound": median(ta) / net}


def test_table_row_holds_medians_ranges_and_ratios():
    r = fake_result()
    cells = table_row(report([r], training_running=False, shape_kji=(120, 512, 512)), "toy (UNet)")
    want = expected(r)
    assert numbers(cells[1]) == [110.0, 100.0, 120.0]  # MONAI: median (min-max)
    assert numbers(cells[2]) == [44.0, 40.0, 50.0]  # medautolabel
    speedup, low, high = numbers(cells[3])
    assert speedup == pytest.approx(want["speedup"], abs=0.005)  # median MONAI time / median medautolabel time
    assert (low, high) == (pytest.approx(min(want["speedups"]), abs=0.005),
                           pytest.approx(max(want["speedups"]), abs=0.005))  # per round: A / B of the same round
    assert [numbers(c)[0] for c in cells[4:7]] == [4100.0, 1025.0, pytest.approx(want["rss_ratio"], abs=0.005)]
    assert numbers(cells[7]) == [0.5, 0.95] and numbers(cells[8]) == [0.995, 0.991]
    assert numbers(cells[9])[0] == pytest.approx(want["e2e"], abs=0.005)


@pytest.mark.parametrize("r, met", [
    (fake_result(), [True, True, True, False]),
    # slower than the target, more memory, a label that disagrees, a small fixed cost
    (fake_result(ours_s=(60.0, 62.0, 61.0), ours_rss=(3000.0, 3100.0, 2900.0),
                 dice_body={"Vessel": 0.98, "Nerve": 0.999}, network_s=55.0), [False, False, False, True]),
])
def test_targets_line_computes_each_figure_and_its_verdict(r, met):
    got = targets(report([r], training_running=False), r["case"])
    want = expected(r)
    # speed-up, its target, the no-fixed-cost bound; RSS, target; Dice, target; end-to-end, target
    speedup, _, bound, rss, _, dice, _, e2e, _ = got["values"]
    assert speedup == pytest.approx(want["speedup"], abs=0.005)
    assert bound == pytest.approx(want["bound"], abs=0.005)
    assert rss == pytest.approx(want["rss_ratio"], abs=0.005)
    assert dice == pytest.approx(want["dice"], abs=0.0005)
    assert e2e == pytest.approx(want["e2e"], abs=0.005)
    assert got["met"] == met
    assert met == [want["speedup"] >= 2.5, want["rss_ratio"] <= 0.5, want["dice"] >= 0.99, want["e2e"] <= 1.3]


def test_report_keeps_every_case_and_flags_a_running_training_job():
    cases = [fake_result(case="toy (UNet)"), fake_result(ours_s=(55.0, 55.0, 55.0), case="toy (SegResNet)")]
    text = report(cases, training_running=False, shape_kji=(120, 512, 512))
    assert numbers(table_row(text, "toy (SegResNet)")[3])[0] == pytest.approx(110 / 55, abs=0.005)
    assert numbers(table_row(text, "toy (UNet)")[3])[0] == pytest.approx(110 / 44, abs=0.005)
    assert "512x512x120" in text and "Vessel 1234" in text
    assert "training job was running" not in text
    assert "training job was running" in report(cases, training_running=True)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_paused_training_job_does_not_count_as_running():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "medautolabel", "train"])
    try:
        me = Path(f"/proc/{proc.pid}")
        assert wait_until(lambda: is_running_training(me)) and training_running()
        proc.send_signal(signal.SIGSTOP)
        assert wait_until(lambda: not is_running_training(me))
    finally:
        proc.kill()
        proc.wait()


def test_the_childs_peak_rss_is_its_own_not_its_parents():
    """A parent that once held 800 MB starts the child: the child reports what it used itself."""
    parent = (f"import subprocess, sys\nimport numpy as np\nblock = np.ones(10**8)\ndel block\n"
              f"sys.exit(subprocess.run([sys.executable, {BENCH_CHILD!r}, 'platform']).returncode)")
    proc = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True, timeout=120)
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("MEDAUTOLABEL_BENCH_MAXRSS_KB")]
    assert 1_000 < int(line.split()[-1]) < 300_000  # a bare interpreter running `python -m platform`


def test_a_new_report_keeps_the_hand_written_sections(tmp_path):
    from bench import KEPT_MARKER, kept_sections

    page = tmp_path / "benchmarks.md"
    assert kept_sections(page) == ""  # no earlier page
    page.write_text(f"# Benchmarks\nold numbers\n\n{KEPT_MARKER}\n\n## Training on a CPU\n50 s\n", encoding="utf-8")
    kept = kept_sections(page)
    assert kept.startswith("\n" + KEPT_MARKER) and "## Training on a CPU\n50 s\n" in kept and "old numbers" not in kept
