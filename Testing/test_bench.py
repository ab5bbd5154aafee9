"""The benchmark's page: ratios and ranges computed from the measured runs, and the paused-training check."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bench import BENCH_CHILD, is_running_training, report, training_running


def fake_result() -> dict:
    return {
        "case": "toy (UNet)",
        "runs": {"monai": [{"seconds": 100.0, "peak_rss_mb": 4000.0}, {"seconds": 120.0, "peak_rss_mb": 4100.0},
                           {"seconds": 110.0, "peak_rss_mb": 3900.0}],
                 "medautolabel": [{"seconds": 40.0, "peak_rss_mb": 1000.0}, {"seconds": 50.0, "peak_rss_mb": 1025.0},
                                  {"seconds": 44.0, "peak_rss_mb": 990.0}]},
        "dice": {"Vessel": 0.5, "Nerve": 0.95}, "dice_body": {"Vessel": 0.995, "Nerve": 0.991},
        "outside_body": {"Vessel": 1234, "Nerve": 0}, "precision": "bfloat16",
        "our_stages_s": {"inference": 22.0, "total": 40.0}, "monai_stages_s": {"inference": 60.0},
    }


def test_report_gives_medians_ranges_and_ratios():
    text = report([fake_result()], training_running=False, shape_kji=(120, 512, 512))
    row = next(line for line in text.splitlines() if line.startswith("| toy (UNet)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "110.0 (100.0–120.0)" and cells[2] == "44.0 (40.0–50.0)"
    assert cells[3] == "2.50x (2.40–2.50)"  # 110/44; per round 100/40, 120/50, 110/44
    assert cells[4:7] == ["4100", "1025", "0.25"]
    assert cells[7] == "Vessel 0.500, Nerve 0.950" and cells[8] == "Vessel 0.995, Nerve 0.991"
    assert cells[9] == "2.00"  # 44 / 22
    assert "Vessel 1234" in text and "bfloat16" in text and "512x512x120" in text
    assert "training job was running" not in text
    target = next(line for line in text.splitlines() if line.startswith("- toy (UNet): speed-up"))
    assert target == ("- toy (UNet): speed-up 2.50x (target 2.5x: met; with no cost but medautolabel's sliding "
                      "window it would be 5.00x); peak RSS 0.25x (target 0.5x: met); lowest "
                      "label Dice in the body 0.991 (target 0.99: met); end-to-end / network 2.00 (target 1.3: "
                      "**not met**).")
    assert "training job was running" in report([fake_result()], training_running=True)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_paused_training_job_does_not_count_as_running():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "medautolabel", "train"])
    try:
        me = Path(f"/proc/{proc.pid}")
        time.sleep(0.3)
        assert is_running_training(me) and training_running()
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.3)
        assert not is_running_training(me)
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
