"""Soak: a bounded mixed load on one esamp-sgl server, and what it leaves behind.

Concurrent clients send a seeded mix of request kinds (KINDS): plain greedy requests (checked
against their reference tokens), exploring requests with n from 1 to 8, streaming on /generate
and on the OpenAI chat endpoint, OpenAI completions, fork programs through SGLang's frontend,
clients that disconnect mid-stream, requests aborted through /abort_request, and bad payloads
(expected: HTTP 400 naming the field). Every request ends in exactly one outcome; outcomes other
than EXPECTED ones are errors, by kind. Three phases (see soak()): plain requests alone; the mix
with no custom_params (the control); the mix exploring — plain latency in the last two, side
by side, is what exploring neighbours cost a plain request. The scheduler's RSS is sampled
after warm-up and at the end; after the load, once the group TTL has passed, no request may
still be exploring and no group may be live.

The server gets a small slot bank (--esamp-max-groups below the number of clients), so groups
are evicted and some exploring requests find every slot held: those are served plain (counted
as plain_no_slot and in the server's refused_no_slot), which is ESamp's documented behaviour.

  .venv/bin/python benchmarks/soak.py                  # full form: saves benchmarks/results/soak.json
  .venv/bin/python benchmarks/soak.py --requests 200 --no-save   # the small form the tests run
  ... --url http://HOST:PORT   # someone's own esamp-sgl serve (RSS then not measured)
  ... --tp-size 2 --requests 500 --name soak_tp2   # the server started here with tensor parallelism
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests
import sglang as sgl
from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

from esamp_sgl.benchmarks.results_io import save_result
from esamp_sgl.launcher import LaunchedServer
from esamp_sgl.models import default_tiny_model
from esamp_sgl.server_check import esamp_states

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "Q: what is 6 * 7?\nA:"]
TOKENS = 16
SLOTS = 4
GROUP_TTL = 2.0
SERVER_FLAGS = ["--esamp-init", "random", "--esamp-max-groups", str(SLOTS), "--esamp-group-ttl", str(GROUP_TTL)]
KINDS = {"plain": 30, "explore": 20, "stream": 10, "openai": 10, "chat_stream": 5, "fork": 10,
         "disconnect": 5, "abort": 5, "bad": 5}
EXPECTED = {"ok", "plain_no_slot", "aborted", "disconnected", "refused_400"}
BAD_ESAMP = [({"beta": -1}, "esamp.beta"), ({"beta": "x"}, "esamp.beta"), ({"beta": 1e9}, "esamp.beta"),
             ({"beta": True}, "esamp.beta"), ({"beta": 0.5, "group": 7}, "esamp.group"),
             ({"beta": 0.5, "seed": -3}, "esamp.seed"), ({"bta": 0.5}, "unknown field")]
TIMEOUT = 300


def plain_request(prompt: str) -> dict:
    """The plain greedy /generate body; its tokens are compared with the reference's."""
    return {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": TOKENS, "ignore_eos": True}}


@sgl.function
def forked(s, prompt, k, beta):
    """A fork program: k answers exploring together (one group), each with its meta_info."""
    s += prompt
    forks = s.fork(k)
    forks += sgl.gen("answer", max_tokens=TOKENS, temperature=0.8, explore=beta)
    s["metas"] = [f.get_meta_info("answer") for f in forks]


@dataclass(frozen=True)
class Outcome:
    kind: str
    result: str  # one of EXPECTED, or an error kind
    seconds: float
    tokens: int = 0
    detail: str = ""


def _exploring_result(metas: list[dict], exploring: bool, tokens: int | None = TOKENS) -> str:
    """Each output is explored whole (every token mixed) or served plain (no slot was free when
    it started); ok when all were explored, in one group, plain_no_slot when some were plain.
    Without ``exploring`` (the control run), ok when none was mixed."""
    if tokens is not None and any(m["completion_tokens"] != tokens for m in metas):
        return "incomplete"
    explored = [m for m in metas if "esamp" in m]
    if not exploring:
        return "mixed_unasked" if explored else "ok"
    if any(m["esamp"]["tokens_mixed"] != m["completion_tokens"] for m in explored):
        return "partly_mixed"
    if len({m["esamp"]["group"] for m in explored}) > 1:
        return "groups_split"
    return "ok" if len(explored) == len(metas) else "plain_no_slot"


class Client:
    """One request of each kind against ``url``; ``reference`` holds the plain greedy tokens."""

    def __init__(self, url: str, reference: dict[str, list[int]], explore: bool = True) -> None:
        """``explore=False``: the same requests without custom_params (the control run)."""
        self.url, self.reference, self.explore = url, reference, explore

    def _esamp(self, rng: random.Random) -> dict:
        beta = rng.choice([0.25, 0.5, 1.0, 2.0])  # drawn either way: both runs send the same requests
        return {"custom_params": {"esamp": {"beta": beta}}} if self.explore else {}

    def send(self, kind: str, rng: random.Random) -> Outcome:
        start = time.perf_counter()
        try:
            result, tokens, detail = getattr(self, "_" + kind)(rng)
        except requests.Timeout:
            result, tokens, detail = "timeout", 0, ""
        except requests.ConnectionError as e:
            result, tokens, detail = "connection", 0, str(e)[:200]
        except Exception as e:  # a malformed answer: counted, not raised
            result, tokens, detail = "malformed", 0, f"{type(e).__name__}: {e}"[:200]
        return Outcome(kind, result, time.perf_counter() - start, tokens, detail)

    def _post(self, path: str, body: dict, **kw) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=TIMEOUT, **kw)

    @staticmethod
    def _status(resp: requests.Response) -> str | None:
        if resp.status_code >= 500:
            return "http_5xx"
        if resp.status_code != 200:
            return f"http_{resp.status_code}"
        return None

    def _plain(self, rng: random.Random):
        prompt = rng.choice(PROMPTS)
        resp = self._post("/generate", plain_request(prompt))
        if err := self._status(resp):
            return err, 0, resp.text[:200]
        out = resp.json()
        return ("ok" if out["output_ids"] == self.reference[prompt] else "plain_changed"), len(out["output_ids"]), ""

    def _explore(self, rng: random.Random):
        n = rng.randint(1, 8)
        resp = self._post("/generate", {"text": rng.choice(PROMPTS), "sampling_params": {
            "temperature": 0.8, "max_new_tokens": TOKENS, "ignore_eos": True, "n": n, **self._esamp(rng)}})
        if err := self._status(resp):
            return err, 0, resp.text[:200]
        outs = resp.json()
        outs = outs if isinstance(outs, list) else [outs]
        metas = [o["meta_info"] for o in outs]
        return (_exploring_result(metas, self.explore) if len(outs) == n else "incomplete"), sum(m["completion_tokens"] for m in metas), ""

    def _stream(self, rng: random.Random):
        with self._post("/generate", {"text": rng.choice(PROMPTS), "stream": True, "sampling_params": {
                "temperature": 0.8, "max_new_tokens": TOKENS, "ignore_eos": True, **self._esamp(rng)}}, stream=True) as resp:
            if err := self._status(resp):
                return err, 0, resp.text[:200]
            chunks = [json.loads(line[len(b"data: "):]) for line in resp.iter_lines()
                      if line.startswith(b"data: ") and line != b"data: [DONE]"]
        meta = chunks[-1]["meta_info"]
        return _exploring_result([meta], self.explore), meta["completion_tokens"], ""

    def _openai(self, rng: random.Random):
        n = rng.randint(1, 4)
        resp = self._post("/v1/completions", {"model": "default", "prompt": rng.choice(PROMPTS), "max_tokens": TOKENS,
                                              "temperature": 0.8, "n": n, **self._esamp(rng)})
        if err := self._status(resp):
            return err, 0, resp.text[:200]
        body = resp.json()
        complete = len(body["choices"]) == n and all(c["finish_reason"] in ("length", "stop") for c in body["choices"])
        return ("ok" if complete else "incomplete"), body["usage"]["completion_tokens"], ""

    def _chat_stream(self, rng: random.Random):
        with self._post("/v1/chat/completions", {"model": "default", "max_tokens": TOKENS, "temperature": 0.8,
                                                 "stream": True, "messages": [{"role": "user", "content": "Hi"}],
                                                 **self._esamp(rng)}, stream=True) as resp:
            if err := self._status(resp):
                return err, 0, resp.text[:200]
            lines = [line for line in resp.iter_lines() if line.startswith(b"data: ")]
        finished = lines and lines[-1] == b"data: [DONE]" and any(
            c.get("finish_reason") for line in lines[:-1] for c in json.loads(line[6:]).get("choices", []))
        return ("ok" if finished else "incomplete"), len(lines), ""

    def _fork(self, rng: random.Random):
        prompt, k, beta = rng.choice(PROMPTS), rng.randint(2, 4), rng.choice([0.5, 1.0])
        state = forked.run(prompt, k, beta if self.explore else None,
                           backend=RuntimeEndpoint(self.url))
        if state.error() is not None:
            return "program_error", 0, repr(state.error())[:200]
        metas = state["metas"]
        return _exploring_result(metas, self.explore, tokens=None), sum(m["completion_tokens"] for m in metas), ""

    def _disconnect(self, rng: random.Random):
        with self._post("/generate", {"text": rng.choice(PROMPTS), "stream": True, "sampling_params": {
                "temperature": 0.8, "max_new_tokens": 2000, "ignore_eos": True, **self._esamp(rng)}}, stream=True) as resp:
            if err := self._status(resp):
                return err, 0, resp.text[:200]
            lines = resp.iter_lines()
            for _ in range(3):
                next(lines)
        return "disconnected", 0, ""  # leaving the with-block closes the connection: SGLang aborts it

    def _abort(self, rng: random.Random):
        rid = "soak-abort-" + uuid.uuid4().hex
        timer = threading.Timer(rng.uniform(0.05, 0.5), lambda: requests.post(
            self.url + "/abort_request", json={"rid": rid}, timeout=30))
        timer.start()
        try:
            resp = self._post("/generate", {"text": rng.choice(PROMPTS), "rid": rid, "sampling_params": {
                "temperature": 0.8, "max_new_tokens": 2000, "ignore_eos": True, **self._esamp(rng)}})
        finally:
            timer.join()
        if resp.status_code >= 500:
            return "http_5xx", 0, resp.text[:200]
        finish = (resp.json().get("meta_info", {}).get("finish_reason") or {}) if resp.status_code == 200 else {}
        if resp.status_code == 200 and finish.get("type") == "length":
            return "ok", 2000, ""  # the abort came after the end
        aborted = finish.get("type") == "abort" or "abort" in resp.text.lower()
        return ("aborted" if aborted else f"http_{resp.status_code}"), 0, resp.text[:200]

    def _bad(self, rng: random.Random):
        esamp, field = rng.choice(BAD_ESAMP)
        path, body = rng.choice([
            ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 2, "custom_params": {"esamp": esamp}}}),
            ("/v1/completions", {"model": "default", "prompt": "x", "max_tokens": 2,
                                 "custom_params": {"esamp": esamp}}),
            ("/v1/chat/completions", {"model": "default", "max_tokens": 2, "custom_params": {"esamp": esamp},
                                      "messages": [{"role": "user", "content": "x"}]})])
        resp = self._post(path, body)
        if resp.status_code == 400 and field in resp.text:
            return "refused_400", 0, ""
        return ("bad_accepted" if resp.status_code == 200 else f"http_{resp.status_code}"), 0, f"{esamp} {resp.text[:150]}"


def scheduler_rss(server: LaunchedServer | None) -> int | None:
    """Resident bytes of the server's scheduler process(es); None for a server not started here."""
    if server is None:
        return None
    procs = psutil.Process(server.process.pid).children(recursive=True)
    return sum(p.memory_info().rss for p in procs if "scheduler" in " ".join(p.cmdline() or [p.name()]))


def run_phase(client: Client, kinds: dict[str, int], count: int, clients: int, seed: int, deadline: float,
              on_progress=None) -> list[Outcome]:
    """``count`` requests (fewer if ``deadline`` passes), drawn from ``kinds`` by weight, ``clients`` at once."""
    names, weights = list(kinds), list(kinds.values())
    lock, outcomes, issued = threading.Lock(), [], [0]

    def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        while time.monotonic() < deadline:
            with lock:
                if issued[0] >= count:
                    return
                issued[0] += 1
            outcome = client.send(rng.choices(names, weights)[0], rng)
            with lock:
                outcomes.append(outcome)
                if on_progress:
                    on_progress(len(outcomes))

    with ThreadPoolExecutor(clients) as pool:
        try:
            list(pool.map(worker, range(clients)))
        except BaseException:  # SIGTERM or Ctrl-C: issue nothing more, let the requests in flight end
            with lock:
                issued[0] = count
            raise
    return outcomes


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(outcomes: list[Outcome], seconds: float) -> dict:
    by_result = Counter(o.result for o in outcomes)
    return {
        "requests": len(outcomes),
        "by_kind": dict(Counter(o.kind for o in outcomes)),
        "outcomes": dict(by_result),
        "errors": {k: v for k, v in by_result.items() if k not in EXPECTED},
        "error_details": sorted({f"{o.kind}: {o.result} {o.detail}" for o in outcomes if o.result not in EXPECTED})[:20],
        "seconds": seconds,
        "tokens_per_second": sum(o.tokens for o in outcomes if o.kind != "abort") / seconds,
    }


def _growth(rss: dict) -> int | None:
    """RSS at a phase's end minus after its warm-up."""
    return rss["end"] - rss["after_warmup"] if rss["end"] and rss["after_warmup"] else None


def plain_latency(outcomes: list[Outcome]) -> dict:
    lat = [o.seconds for o in outcomes if o.kind == "plain" and o.result == "ok"]
    return {"count": len(lat), "p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)}


def soak(url: str, server: LaunchedServer | None, *, requests_total: int, clients: int, seconds: float,
         seed: int = 0) -> dict:
    """Three phases on one server: plain requests only; the mix without explore (the control:
    the same requests, drawn from the same seeds, with no custom_params); the mix exploring.
    Plain latency in the control and exploring phases, side by side, is ESamp's cost to the
    plain requests batched beside exploring ones."""
    reference = {}
    for prompt in PROMPTS:  # one at a time on an idle server
        reference[prompt] = requests.post(url + "/generate", json=plain_request(prompt),
                                          timeout=TIMEOUT).json()["output_ids"]
    deadline = time.monotonic() + seconds
    baseline = esamp_states(url)[0]

    def timed_phase(client: Client, kinds: dict[str, int], count: int, phase_seed: int, on_progress=None):
        started = time.perf_counter()
        outcomes = run_phase(client, kinds, count, clients, phase_seed, deadline, on_progress)
        return outcomes, time.perf_counter() - started

    warmup_at = max(clients, requests_total // 10)

    def rss_sampler(rss: dict):
        """Samples the scheduler's RSS every 5% of a phase; ``after_warmup`` at its first 10%."""
        def sample(done: int) -> None:
            if done == warmup_at or done % max(1, requests_total // 20) == 0:
                rss["samples"].append(value := scheduler_rss(server))
                if done == warmup_at:
                    rss["after_warmup"] = value
        return sample

    plain_count = max(clients * 2, requests_total // 10)
    plain, plain_seconds = timed_phase(Client(url, reference), {"plain": 1}, plain_count, seed)
    rss_control = {"after_warmup": None, "samples": []}
    control, control_seconds = timed_phase(Client(url, reference, explore=False), KINDS, requests_total, seed + 1,
                                           rss_sampler(rss_control))
    rss_control["end"] = scheduler_rss(server)
    rss = {"after_warmup": None, "samples": []}
    mixed, mixed_seconds = timed_phase(Client(url, reference), KINDS, requests_total, seed + 1, rss_sampler(rss))
    after_load = esamp_states(url)[0]
    time.sleep(GROUP_TTL + 1.0)  # TTLs pass: every unpinned group expires
    settled = esamp_states(url)[0]
    rss["end"] = scheduler_rss(server)
    plain_after = Client(url, reference).send("plain", random.Random(seed))

    latency = {"plain_phase": plain_latency(plain), "control_phase": plain_latency(control),
               "exploring_phase": plain_latency(mixed)}
    ratio = (latency["exploring_phase"]["p50"] / latency["control_phase"]["p50"]
             if latency["exploring_phase"]["p50"] and latency["control_phase"]["p50"] else None)
    counters = ("groups_live", "requests_exploring", "slots_evicted", "slots_max", "refused_no_slot",
                "groups_created", "hook_errors", "distiller_resets", "mixed_tokens", "slot_tables_agree")
    return {
        "workload": {"kinds": KINDS, "clients": clients, "tokens": TOKENS, "seed": seed, "server_flags": SERVER_FLAGS,
                     "plain_phase_requests": plain_count, "mixed_phase_requests": requests_total},
        "plain_phase": summarize(plain, plain_seconds),
        "control_phase": summarize(control, control_seconds),
        "exploring_phase": summarize(mixed, mixed_seconds),
        "plain_latency_seconds": latency,
        "plain_p50_exploring_over_control": ratio,
        "scheduler_rss_bytes": {"control_phase": rss_control, "exploring_phase": rss},
        "rss_end_over_warmup": rss["end"] / rss["after_warmup"] if rss["end"] and rss["after_warmup"] else None,
        "rss_growth_bytes": {"control_phase": _growth(rss_control), "exploring_phase": _growth(rss)},
        "server_before": {k: baseline.get(k) for k in counters},
        "server_after_load": {k: after_load.get(k) for k in counters},
        "server_after_ttl": {k: settled.get(k) for k in counters},
        "plain_request_after": plain_after.result,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an esamp-sgl server already running (default: start one on the tiny model)")
    parser.add_argument("--model", help="model for the server started here (default: the project's tiny model)")
    parser.add_argument("--requests", type=int, default=2000, help="requests in the mixed phase")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1800, help="stop sending after this long, whatever is left")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="print the result; do not write soak.json")
    parser.add_argument("--name", default="soak", help="results file: benchmarks/results/NAME.json")
    parser.add_argument("--tp-size", type=int, default=1, help="tensor parallelism of the server started here")
    args = parser.parse_args(argv)
    if args.url:
        result = soak(args.url.rstrip("/"), None, requests_total=args.requests, clients=args.clients,
                      seconds=args.seconds, seed=args.seed)
    else:
        model = args.model or str(default_tiny_model())
        log = Path(tempfile.gettempdir()) / "esamp-soak-server.log"
        flags = [*SERVER_FLAGS, *(["--tp-size", str(args.tp_size)] if args.tp_size > 1 else [])]
        with LaunchedServer(model, flags, log_path=log) as server:
            result = soak(server.url, server, requests_total=args.requests, clients=args.clients,
                          seconds=args.seconds, seed=args.seed)
        result["workload"].update(model=model, server_flags=flags)
    print(json.dumps(result, indent=2))
    if not args.no_save:
        save_result(args.name, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
