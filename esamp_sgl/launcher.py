"""Start an SGLang server (through ``esamp-sgl serve``'s command) in the background and stop it.

Used by the demo, the benchmarks and the test fixtures: a free loopback port, a log file,
a health wait that fails fast if the process dies, and a teardown that kills the whole process
tree (SGLang spawns scheduler and detokenizer processes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from esamp_sgl.serve import server_command, server_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


class LaunchedServer:
    """A running SGLang server; use as a context manager or call ``stop()``."""

    def __init__(self, model: str, sglang_args: Sequence[str] = (), *, log_path: Path,
                 startup_timeout: float = 300.0, env: dict[str, str | None] | None = None) -> None:
        """``env`` overrides the server's environment; a None value removes that variable."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = server_command(model, [*sglang_args, "--host", "127.0.0.1", "--port", str(self.port)])
        self._log = open(self.log_path, "w")
        merged = {**server_env(), **(env or {})}
        self.process = subprocess.Popen(cmd, env={k: v for k, v in merged.items() if v is not None}, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_healthy(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"server exited with {self.process.returncode}; log:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health_generate", timeout=30).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise ServerStartError(f"server not healthy after {timeout:.0f}s; log:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> "LaunchedServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
