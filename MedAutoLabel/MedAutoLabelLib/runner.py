"""Runs labelling in a background worker process without blocking the caller (no Qt here).

The panel calls ``start`` and then ``poll()`` from a QTimer: ``poll`` never blocks; it returns the
worker's messages that arrived since the last call. ``cancel`` kills the worker's whole process
group within a second and removes the private temporary folder. The worker process stays alive
between runs, so a second run with the same model does not load it again.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Sequence

from medautolabel.image import Image
from medautolabel.options import LabelOptions, make_options
from medautolabel.text import printable, printable_fields

WORKER = Path(__file__).resolve().parent / "worker.py"
TRAIN_WORKER = Path(__file__).resolve().parent / "train_worker.py"
MODULE_DIR = WORKER.parent.parent


def default_python() -> str:
    """Slicer's PythonSlicer next to the running interpreter when there is one, else this interpreter."""
    exe = Path(sys.executable)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        candidate = exe.parent / name
        if candidate.exists():
            return str(candidate)
    return sys.executable


class WorkerProcess:
    """One long-lived worker process and the thread that reads its output lines into a queue."""

    def __init__(self, python: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 script: Path = WORKER, args: Sequence[str] = ()) -> None:
        environment = dict(os.environ if env is None else env)
        environment["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR)] + [p for p in
                                                     environment.get("PYTHONPATH", "").split(os.pathsep) if p])
        environment.setdefault("PYTHONUNBUFFERED", "1")
        kwargs: Dict[str, Any] = {}
        if os.name == "nt":  # pragma: no cover - Windows
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # its own process group: cancel kills all of it
        self.proc = subprocess.Popen([python or default_python(), "-u", str(script), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env=environment, **kwargs)
        self.messages: queue.Queue[Dict[str, Any]] = queue.Queue()
        self.stderr: Deque[str] = deque(maxlen=200)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                message = json.loads(line)
            except ValueError:
                message = None
            if isinstance(message, dict):  # it reaches the panel's labels and dialogs: its text made inert
                self.messages.put(printable_fields(message))
            else:
                self.stderr.append(printable(line))  # stray prints from libraries
        self.messages.put({"event": "exit", "returncode": self.proc.wait()})

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(printable(line.rstrip()))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, request: Dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """End the worker and everything it started, now."""
        if self.proc.poll() is None:
            try:
                if os.name == "nt":  # pragma: no cover - Windows
                    subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)], capture_output=True,
                                   check=False)
                else:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def close(self) -> None:
        """Let the worker finish (end of input), or kill it if it does not within a few seconds."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()


class BackgroundLabeller:
    """Labels engine images in a worker process, one run at a time; poll for progress and the result."""

    def __init__(self, python: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> None:
        self.python, self.env = python, env
        self.worker: Optional[WorkerProcess] = None
        self.tmp: Optional[Path] = None
        self.run_id = 0
        self.running = False

    def start(self, image: Image, model: str, options: Optional[LabelOptions] = None,
              low_confidence: Optional[float] = None, **changes: Any) -> int:
        """Hand ``image`` to the worker (as an uncompressed NRRD in a private temporary folder); returns a run id.

        ``options`` (keyword ``changes`` such as ``device="cpu"`` amend it; ``low_confidence`` is the
        panel's name for ``low_confidence_threshold``) travel whole, as ``options.to_mapping()``.
        """
        from medautolabel.io.images import write_image

        if low_confidence is not None:
            changes["low_confidence_threshold"] = low_confidence
        options = make_options(options, **changes)  # a bad option fails here, before a worker starts
        if self.running:
            raise RuntimeError("a run is already in progress")
        if self.worker is None or not self.worker.alive():
            self.worker = WorkerProcess(self.python, self.env)
        self.tmp = Path(tempfile.mkdtemp(prefix="medautolabel-run-"))
        write_image(image, self.tmp / "input.nrrd", compress=False)
        self.run_id += 1
        self.running = True
        self.worker.send({"id": self.run_id, "image": str(self.tmp / "input.nrrd"), "output": str(self.tmp),
                          "model": model, "options": options.to_mapping(), "modality": image.meta.get("modality")})
        return self.run_id

    def poll(self) -> List[Dict[str, Any]]:
        """Messages of the current run that arrived since the last call (never blocks)."""
        out: List[Dict[str, Any]] = []
        if self.worker is None:
            return out
        while True:
            try:
                message = self.worker.messages.get_nowait()
            except queue.Empty:
                return out
            if message.get("event") == "exit" and self.running:
                self.running = False
                out.append({"id": self.run_id, "event": "error", "message": "the worker process ended unexpectedly",
                            "details": "\n".join(self.worker.stderr)})
            elif message.get("id") == self.run_id:
                if message["event"] in ("done", "error"):
                    self.running = False
                out.append(message)

    def wait(self, timeout: float = 600.0) -> Dict[str, Any]:
        """Block until the current run ends; returns its last message (for tests and scripts)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.poll():
                if message["event"] in ("done", "error"):
                    return message
            time.sleep(0.05)
        raise TimeoutError("the background run did not finish in time")

    def read_result(self, message: Dict[str, Any]):
        """The engine Result of a ``done`` message (labelmap from the .seg.nrrd, facts from tags.json)."""
        from medautolabel.io.segnrrd import read_seg_nrrd
        from medautolabel.result import result_from_facts

        labelmap, _ = read_seg_nrrd(message["segmentation"])
        facts = json.loads(Path(message["tags"]).read_text(encoding="utf-8"))
        return result_from_facts(labelmap, facts)

    def cleanup(self) -> None:
        """Remove the current run's temporary folder."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def cancel(self) -> None:
        """Stop the current run now: kill the worker's process tree and remove the temporary files."""
        if self.worker is not None:
            self.worker.kill()
            self.worker = None
        self.running = False
        self.cleanup()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        self.cleanup()


class BackgroundTrainer:
    """Trains a model in a background process (``train_worker.py``); poll for epochs, losses and the end."""

    def __init__(self, python: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> None:
        self.python, self.env = python, env
        self.process: Optional[WorkerProcess] = None
        self.running = False

    def start(self, data: Path, model_dir: Path, base: Optional[str] = None, epochs: Optional[int] = None,
              device: str = "auto") -> None:
        if self.running:
            raise RuntimeError("a training run is already in progress")
        arguments = {"data": str(data), "model_dir": str(model_dir), "base": base, "epochs": epochs,
                     "device": device}
        self.process = WorkerProcess(self.python, self.env, script=TRAIN_WORKER, args=[json.dumps(arguments)])
        self.running = True

    def poll(self) -> List[Dict[str, Any]]:
        """Messages since the last call (never blocks); an unexpected exit becomes an error message."""
        out: List[Dict[str, Any]] = []
        if self.process is None:
            return out
        while True:
            try:
                message = self.process.messages.get_nowait()
            except queue.Empty:
                return out
            if message.get("event") == "exit":
                if self.running:
                    out.append({"event": "error", "message": "training ended unexpectedly",
                                "details": "\n".join(self.process.stderr)})
                self.running = False
            else:
                if message.get("event") in ("done", "error"):
                    self.running = False
                out.append(message)

    def cancel(self) -> None:
        """Stop now; the run folder keeps its last finished epoch (``medautolabel train --resume``)."""
        if self.process is not None:
            self.process.kill()
        self.running = False
