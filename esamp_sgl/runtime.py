"""``esamp_sgl.Runtime``: a local ESamp server for scripts and notebooks, in the spirit of
``sgl.Runtime`` (the server runs in the background; SGLang's language layer talks HTTP to it)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

from esamp_sgl.launcher import LaunchedServer


class Runtime:
    """``Runtime("smollm2-135m", "--esamp-lr", "0.01")``; use with ``sgl.set_default_backend``."""

    def __init__(self, model: str, *flags: str, log_path: Path | None = None) -> None:
        log = log_path or Path(tempfile.gettempdir()) / "esamp-sgl-runtime.log"
        self.server = LaunchedServer(model, flags, log_path=log)
        self.url = self.server.url
        self.endpoint = RuntimeEndpoint(self.url)

    def shutdown(self) -> None:
        self.server.stop()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
