"""Background training for the panel: ``python train_worker.py '<json arguments>'`` prints JSON lines.

Lines: ``{"event": "log", "message"}``, ``{"event": "progress", "epoch", "epochs", "loss", ...}``,
then ``{"event": "done", "model_dir"}`` or ``{"event": "error", "message", "details"}``.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def _send(message) -> None:
    sys.stdout.write(json.dumps(message, default=float) + "\n")
    sys.stdout.flush()


def main(arguments: dict) -> int:
    from medautolabel.errors import MedAutoLabelError
    from medautolabel.training import train

    try:
        train(arguments["data"], arguments["model_dir"], base=arguments.get("base"),
              device=arguments.get("device", "auto"), epochs=arguments.get("epochs"),
              log=lambda m: _send({"event": "log", "message": str(m)}),
              progress=lambda info: _send(dict(info, event="progress")))
    except MedAutoLabelError as e:
        _send({"event": "error", "message": str(e), "details": ""})
        return 2
    except Exception as e:
        _send({"event": "error", "message": f"{type(e).__name__}: {e}", "details": traceback.format_exc()})
        return 1
    _send({"event": "done", "model_dir": str(arguments["model_dir"])})
    return 0


if __name__ == "__main__":
    here = Path(__file__).resolve().parent.parent
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    sys.exit(main(json.loads(sys.argv[1])))
