"""Helpers for the sdrt serve tests: servers on 127.0.0.1 with free ports, in a thread or as a real
``sdrt serve`` subprocess; every wait is bounded in count and time."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

PROMPT = "a photo of a cat"


class ThreadServer:
    """uvicorn serving ``create_app(executor, options)`` in a thread, on a free loopback port."""

    def __init__(self, executor, options=None):
        import uvicorn

        from sdrt.serve.app import create_app
        from sdrt.serve.cli import listen, make_server

        self.executor = executor
        self.app = create_app(executor, options)
        self.state = self.app.state.sdrt
        self.sock = listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(uvicorn, self.app, self.state, self.state.options.drain_timeout)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


class SubprocessServer:
    """A real ``sdrt serve`` process (``--port 0``; the port is read from its start-up log line)."""

    def __init__(self, engines, *flags, env=None):
        cmd = [sys.executable, "-m", "sdrt.cli", "serve", "--engines", str(engines), "--port", "0", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline, self.port = time.monotonic() + 120, None
        while self.port is None:
            assert time.monotonic() < deadline, "no start-up line:\n" + "\n".join(self.lines)
            assert self.proc.poll() is None, "sdrt serve exited:\n" + "\n".join(self.lines)
            for line in list(self.lines):
                match = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
                if match:
                    self.port = int(match[1])
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_ready(self, client, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if client.get(f"{self.url}/readyz").status_code == 200:
                return
            time.sleep(0.1)
        raise AssertionError("never ready:\n" + "\n".join(self.lines))

    def terminate(self, timeout=90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._reader.join(5)


def b64_png(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def pixels(data) -> np.ndarray:
    """uint8 HxWx3 of a PIL image, PNG bytes, or base64 PNG."""
    if isinstance(data, str):
        data = base64.b64decode(data)
    if isinstance(data, (bytes, bytearray)):
        data = Image.open(io.BytesIO(data))
    return np.asarray(data.convert("RGB"))


def png_text(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        return image.text.get("parameters", "")


def wait_until(predicate, timeout=60.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


class SlowExecutor:
    """Wraps an executor: ``delay`` s per step, and requests whose prompt is ``gate`` wait for ``gate_open``
    (still answering cancel at each wait tick). Records every request it ran (jobs cancelled while queued
    never show up here)."""

    def __init__(self, inner, delay=0.0):
        self.inner, self.delay = inner, delay
        self.concurrency, self.manifest_info = inner.concurrency, inner.manifest_info
        self.gate_open = threading.Event()
        self.ran: list = []

    def ready(self):
        return self.inner.ready()

    def generate(self, req, on_step):
        from sdrt.errors import Cancelled

        self.ran.append(req)
        if req.prompt == "gate":
            deadline = time.monotonic() + 120
            while not self.gate_open.wait(0.02):
                if on_step(0, req.steps) is False or time.monotonic() > deadline:
                    raise Cancelled("cancelled at the gate")

        def slow(step, total):
            time.sleep(self.delay)
            return on_step(step, total)

        return self.inner.generate(req, slow)

    def close(self):
        self.inner.close()


def write_token(path: Path, token: str) -> Path:
    path.write_text(f"# tokens\n{token}\n")
    return path


def controlnet_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model exported with one random ControlNet (``write_random_controlnet``: non-zero residuals),
    sizes 64..128, max batch 2; exported once per session, whichever test module asks first (serve, C ABI)."""
    from sdrt.specs import SizeRange
    from sdrt_export import controlnet as cn
    from sdrt_export.exporter import export_model

    root = tmp_path_factory.getbasetemp() / "wire-controlnet"
    out = root / "tiny-cn"
    if not (out / "manifest.json").exists():
        net = cn.write_random_controlnet(tiny_model_dir, root / "net0", seed=1)
        export_model(tiny_model_dir, out, sizes=SizeRange(64, 64, 128, 2), progress=False, controlnet_dirs=[net])
    return out


def control_picture(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic RGB picture (gradients and noise), a stand-in for an edge or depth map."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([x * (seed % 3), y, (x + y) / 2], axis=-1) * 200 + rng.uniform(0, 55, (height, width, 3))
    return Image.fromarray(rgb.astype(np.uint8))


def kandinsky_artifact(tmp_path_factory) -> Path:
    """``sdrt make-model --arch tiny-kandinsky22`` exported (sizes 64..128, max batch 2), once per session."""
    from sdrt.specs import SizeRange
    from sdrt_export.exporter import export_model
    from sdrt_export.make_model import make_model

    root = tmp_path_factory.getbasetemp() / "wire-kandinsky"
    out = root / "tiny-k22"
    if not (out / "manifest.json").exists():
        model = make_model(root / "model", arch="tiny-kandinsky22", seed=0)
        export_model(model, out, sizes=SizeRange(min_size=64, opt_size=64, max_size=128, max_batch=2), progress=False)
    return out
