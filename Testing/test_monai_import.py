"""MONAI imported without ignite, scipy.signal and matplotlib, in a fresh interpreter each time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec

import pytest

SKIPPED = ("ignite", "scipy.signal", "matplotlib")


def _python(code: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_lean_import_skips_the_packages_and_they_stay_importable():
    facts = _python(f"""
import json, sys
from medautolabel.runtime.monai_import import import_lean
first = import_lean()
loaded = {{name: name in sys.modules for name in {SKIPPED!r}}}
hidden_left = [name for name in {SKIPPED!r} if name in sys.modules and sys.modules[name] is None]
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,)).eval()
with torch.no_grad():
    out = sliding_window_inference(torch.rand(1, 1, 20, 20, 20), (16, 16, 16), 1, net, overlap=0.25)
import scipy.signal
later = {{"scipy.signal": hasattr(scipy.signal, "hilbert")}}
print(json.dumps({{"first": first, "second": import_lean(), "loaded": loaded, "hidden_left": hidden_left,
                  "out": list(out.shape), "later": later}}))
""")
    assert facts["first"] is True and facts["second"] is False
    assert facts["loaded"] == {name: False for name in SKIPPED}
    assert facts["hidden_left"] == []
    assert facts["out"] == [1, 2, 20, 20, 20]
    assert facts["later"] == {"scipy.signal": True}


@pytest.mark.slow
@pytest.mark.skipif(find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_a_package_already_imported_is_used_by_monai_as_usual():
    facts = _python("""
import json
import matplotlib
from medautolabel.runtime.monai_import import import_lean
import_lean()
from monai.utils import jupyter_utils
print(json.dumps({"has_matplotlib": jupyter_utils.has_matplotlib}))
""")
    assert facts == {"has_matplotlib": True}


@pytest.mark.slow
def test_the_label_command_imports_monai_lean(tmp_path):
    facts = _python(f"""
import json, sys
import numpy as np
from medautolabel.cli import app as cli
from medautolabel.image import Image
from medautolabel.io.images import write_image
volume = np.full((24, 24, 24), -1000, np.int16)
volume[4:20, 4:20, 4:20] = 40
write_image(Image(volume, np.diag([1.5, 1.5, 1.5, 1.0])), {str(tmp_path / 'ct.nii.gz')!r})
status = cli.main(["label", {str(tmp_path / 'ct.nii.gz')!r}, "-o", {str(tmp_path / 'out')!r}, "-q", "--device", "cpu"])
print(json.dumps({{"status": status, "loaded": [n for n in {SKIPPED!r} if n in sys.modules]}}))
""")
    assert facts == {"status": 0, "loaded": []}
    assert (tmp_path / "out" / "ct.seg.nrrd").is_file()
