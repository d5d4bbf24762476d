"""Helpers of the service tests: uvicorn on a free loopback port, in a thread."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from romebert.cli import main
from romebert.deploy.service import Service, uvicorn_settings


def export_for_serving(run: Path, folder: Path) -> Path:
    """The tiny SST-2 run exported to ``folder``/export at entropy threshold 0.5 (about half the test
    sentences leave at exit 1)."""
    out = folder / "export"
    assert main(["export", str(run), "-o", str(out), "--threshold", "0.5"]) == 0
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread, on a free loopback port."""

    def __init__(self, service: Service, **settings) -> None:
        self.port = free_port()
        self.service = service
        opts = {"host": "127.0.0.1", "port": self.port, "log_level": "error", "timeout_graceful_shutdown": 10}
        config = uvicorn.Config(service.app(), **uvicorn_settings(**{**opts, **settings}))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def post(server: Server, payload, **kw) -> httpx.Response:
    body = payload if isinstance(payload, bytes | str) else json.dumps(payload)
    return httpx.post(server.url + "/predict", content=body, headers={"content-type": "application/json"},
                      timeout=30, **kw)  # fmt: skip


def expected(reference, texts, **options) -> list[tuple[str, int]]:
    out = reference.predict_with_exits(texts, **options)
    return [(label, int(k)) for label, k in zip(out.labels, out.exit_layers)]


def metric(text: str, key: str) -> float:
    """The value of one sample line of a Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0
