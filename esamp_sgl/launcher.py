"""Start an SGLang server (through ``esamp-sgl serve``'s command) in the background and stop it.

Used by the demo, the benchmarks and the test fixtures: a free loopback port, a log file,
a health wait that fails fast if the process dies, and a teardown that kills the whole process
tree (SGLang spawns scheduler and detokenizer processes).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

from esamp_sgl.serve import build_launch, prepare
from esamp_sgl.server_check import ServerNotReady, check_esamp_active, wait_healthy


# Below the kernel's ephemeral range, which bind(0) and every outgoing connection draw from: a
# port from bind(0), bound only tens of seconds later by the server, can meanwhile become the
# local end of some connection (a TP server's gloo mesh opens many), and the server then fails
# to bind and hangs. Under SGLang's own range for such ports (22000-29999), so as not to meet it.
PORT_RANGE = (12000, 21999)


def free_port(attempts: int = 64) -> int:
    """A loopback port that is free now and outside the range outgoing connections use."""
    for port in random.sample(range(PORT_RANGE[0], PORT_RANGE[1] + 1), attempts):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {PORT_RANGE} after {attempts} tries")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def unwind_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so context managers and ``finally`` blocks run.

    The server runs in its own session (its process group is killed as a whole on stop), so a
    client killed by the default SIGTERM action would leave it running, busy-polling a core.
    Only where SIGTERM still has its default action, and only from the main thread (where
    Python allows handlers)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


class LaunchedServer:
    """A running SGLang server; use as a context manager or call ``stop()``. Starting one makes
    SIGTERM to this process unwind (``unwind_on_sigterm``), so the server stops with it."""

    def __init__(self, model: str, sglang_args: Sequence[str] = (), *, log_path: Path,
                 startup_timeout: float = 300.0, env: dict[str, str | None] | None = None) -> None:
        """``env`` overrides the server's environment; a None value removes that variable."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        launch = build_launch(model, [*sglang_args, "--host", "127.0.0.1", "--port", str(self.port)])
        self.esamp = launch.esamp
        unwind_on_sigterm()
        prepare(launch)
        self._log = open(self.log_path, "w")
        merged = {**launch.env, **(env or {})}
        self.process = subprocess.Popen(launch.command, env={k: v for k, v in merged.items() if v is not None},
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_healthy(self.url, self.process, startup_timeout)
            if self.esamp is not None:
                check_esamp_active(self.url)
        except ServerNotReady as e:
            self.stop()
            raise ServerNotReady(f"{e}; server log:\n{self.log_tail()}") from e
        except BaseException:
            self.stop()
            raise

    def log_tail(self, chars: int = 6000) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def terminate(self) -> None:
        """Ask the server's whole process group to stop (SIGTERM) and return at once; SGLang
        takes about 5 s to shut down. ``stop()`` waits for it."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        self.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
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
