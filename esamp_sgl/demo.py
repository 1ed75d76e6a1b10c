"""``esamp-sgl demo``: start a CPU server with SmolLM2 and show a real generation."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import requests

from esamp_sgl.launcher import LaunchedServer

PROMPTS = ["What is 7 + 5?", "Name three colors of the rainbow.", "Write one sentence about the sea."]


def run_demo(model: str) -> int:
    log = Path(tempfile.gettempdir()) / "esamp-sgl-demo-server.log"
    print(f"starting SGLang server for {model} (log: {log}) ...", flush=True)
    with LaunchedServer(model, log_path=log) as server:
        for prompt in PROMPTS:
            start = time.perf_counter()
            resp = requests.post(server.url + "/v1/chat/completions", json={
                "model": "default", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 48, "temperature": 0,
            }, timeout=300)
            resp.raise_for_status()
            body = resp.json()
            tokens = body["usage"]["completion_tokens"]
            elapsed = time.perf_counter() - start
            print(f"\n> {prompt}\n{body['choices'][0]['message']['content'].strip()}\n"
                  f"[{tokens} tokens, {tokens / elapsed:.1f} tok/s]", flush=True)
    return 0
