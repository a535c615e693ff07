"""A bounded soak test of `r1 serve`: C concurrent clients of mixed, partly hostile traffic for S seconds.

It starts `r1 serve` itself (demo-small with R1's tokenizer, a 1024-token context, a random API key,
on 127.0.0.1 and a free port) and runs `--clients` async clients for `--seconds`, each looping over
a seeded random mix of:
  chat     a short chat completion (16 tokens, 2 of them reasoning): must be a 200
  stream   the same, streamed and read to the end: a 200 whose last event is `data: [DONE]`
  drop     a long stream the client closes after its first 1-3 chunks
  abort    a long non-streamed chat the client gives up on after 0.2 s
  hostile  the next of hostile()'s requests: invalid JSON, out-of-range numbers, token ids outside the
           vocabulary, too many or too long stop strings, a text/plain body, a foreign Host header,
           a wrong API key: each must get a 4xx; a temperature of 1e-40 is valid and must get a 200
Every answer is counted as ok, an expected 4xx (by code), or an error by kind: an unexpected status
(with its code), a timeout (`--timeout`, 60 s), a connection error, a malformed stream. Then it
waits for the server to go idle and reads /metrics: the KV blocks still held (`r1_kv_cache_blocks`
minus `r1_kv_cache_free_blocks`) are leaked. It reports the server's RSS (VmRSS) once the model
has loaded and at the end, stops it with SIGTERM and reports its exit code. Not part of pytest.

    python bench/soak.py                                   # 64 clients for 120 s
    python bench/soak.py --clients 8 --seconds 20          # a smoke run
    python bench/soak.py --save bench/results/soak_demo_small.json

Exits 1 if a well-formed request erred, a KV block leaked, or the server did not go idle or stop
cleanly. A hostile request answered otherwise than with a 4xx is reported but does not fail the run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2

from r1 import bench

HOST = "127.0.0.1"  # the soak never listens anywhere else
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MIX = {"chat": 3, "stream": 3, "drop": 2, "abort": 2, "hostile": 3}  # relative weights
WELL_FORMED = ("chat", "stream", "drop", "abort", "hostile/temperature_1e-40")


def chat_body(rng, long: bool = False, **extra) -> dict:
    """Short: 16 tokens, reasoning cut at 2. Long: 256 tokens with eos ignored, for drops and aborts."""
    size = {"max_tokens": 256, "ignore_eos": True} if long else {"max_tokens": 16, "max_reasoning_tokens": 2}
    return {
        "messages": [{"role": "user", "content": f"Say hello to visitor {rng.randrange(1000)}."}],
        "temperature": 0.6,
        "seed": rng.randrange(1 << 31),
        **size,
        **extra,
    }


def hostile(rng) -> dict[str, tuple[str, dict, int]]:
    """name: (path, httpx request options, the expected status class: 200 or 400 for any 4xx)."""
    as_json = {"content-type": "application/json"}
    return {
        "invalid_json": (CHAT, {"content": b'{"messages": [', "headers": as_json}, 400),
        "top_k_2^63": (CHAT, {"json": chat_body(rng, top_k=2**63)}, 400),
        "seed_2^64": (CHAT, {"json": chat_body(rng, seed=2**64)}, 400),
        "prompt_[-1]": (COMPLETIONS, {"json": {"prompt": [-1], "max_tokens": 4}}, 400),
        "prompt_[2^32]": (COMPLETIONS, {"json": {"prompt": [2**32], "max_tokens": 4}}, 400),
        "n_17": (CHAT, {"json": chat_body(rng, n=17)}, 400),
        "17_stops": (CHAT, {"json": chat_body(rng, stop=[f"stop{i}" for i in range(17)])}, 400),
        "1MB_stop": (CHAT, {"json": chat_body(rng, stop="x" * (1 << 20))}, 400),  # a 400 or a 413
        "text_plain": (
            CHAT,
            {"content": json.dumps(chat_body(rng)).encode(), "headers": {"content-type": "text/plain"}},
            400,
        ),  # a 415
        # Only the Host header is foreign: the connection still goes to 127.0.0.1.
        "host_evil.example": (CHAT, {"json": chat_body(rng), "headers": {"host": "evil.example"}}, 400),
        "wrong_api_key": (CHAT, {"json": chat_body(rng), "headers": {"authorization": "Bearer wrong"}}, 400),
        "temperature_1e-40": (CHAT, {"json": chat_body(rng, temperature=1e-40)}, 200),
    }


def judge(status: int, expected: int) -> str:
    if expected == 400 and 400 <= status < 500:
        return f"4xx:{status}"
    return "ok" if status == expected else f"status {status}"


async def stream(client: httpx2.AsyncClient, body: dict, close_after: int | None = None) -> str:
    """Read a chat stream to its end, or hang up after `close_after` events."""
    async with client.stream("POST", CHAT, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return f"status {r.status_code}"
        events = []
        async for line in r.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: "):
                return "malformed stream"
            events.append(line[len("data: ") :])
            if close_after is not None and len(events) >= close_after:
                return "ok"  # leaving the block closes the connection mid-stream
    if not events or events[-1] != "[DONE]":
        return "malformed stream"
    try:
        chunks = [json.loads(e) for e in events[:-1]]
    except json.JSONDecodeError:
        return "malformed stream"
    return "stream error" if any("error" in c or "choices" not in c for c in chunks) else "ok"


async def one(client: httpx2.AsyncClient, kind: str, rng, hostile_cases) -> tuple[str, str]:
    """Send one request of `kind`; (its kind, narrowed to the case for a hostile one; its outcome)."""
    try:
        if kind == "chat":
            return kind, judge((await client.post(CHAT, json=chat_body(rng))).status_code, 200)
        if kind == "stream":
            return kind, await stream(client, chat_body(rng, stream_options={"include_usage": True}))
        if kind == "drop":
            return kind, await stream(client, chat_body(rng, long=True), close_after=rng.randint(1, 3))
        if kind == "abort":
            try:
                r = await client.post(CHAT, json=chat_body(rng, long=True), timeout=0.2)
                return kind, judge(r.status_code, 200)
            except httpx2.TimeoutException:
                return kind, "ok"  # the client gave up, as it meant to
        name = next(hostile_cases)
        path, options, expected = hostile(rng)[name]
        kind = f"hostile/{name}"
        return kind, judge((await client.post(path, **options)).status_code, expected)
    except httpx2.TimeoutException:
        return kind, "timeout"
    except httpx2.TransportError as e:
        return kind, f"connection error ({type(e).__name__})"


async def soak(url: str, key: str, clients: int, seconds: float, seed: int, timeout: float) -> tuple[dict, float]:
    """Run the clients; ({kind: Counter of outcomes}, wall seconds)."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    deadline = time.monotonic() + seconds
    # The clients take hostile cases in turn from one shuffled cycle, so a short run meets them all.
    names = sorted(hostile(random.Random(0)))
    random.Random(seed).shuffle(names)
    hostile_cases = itertools.cycle(names)

    async def client_loop(i: int, client: httpx2.AsyncClient) -> None:
        rng = random.Random(f"{seed}/{i}")
        while time.monotonic() < deadline:
            kind, outcome = await one(client, rng.choices(list(MIX), list(MIX.values()))[0], rng, hostile_cases)
            counts[kind][outcome] += 1

    start = time.monotonic()
    async with httpx2.AsyncClient(
        base_url=url,
        headers={"authorization": f"Bearer {key}"},
        timeout=timeout,
        limits=httpx2.Limits(max_connections=None),
        trust_env=False,
    ) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    return dict(counts), time.monotonic() - start


def metrics(url: str) -> dict[str, float]:
    text = httpx2.get(url + "/metrics", trust_env=False, timeout=10).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def wait_idle(url: str, timeout: float) -> tuple[bool, dict]:
    """Poll /metrics until nothing runs or waits and no block is held (or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = m["r1_requests_running"] == m["r1_requests_waiting"] == 0
        if (idle and m["r1_kv_cache_free_blocks"] == m["r1_kv_cache_blocks"]) or time.monotonic() > deadline:
            return idle, m
        time.sleep(0.2)


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


class Server:
    """`r1 serve` in a subprocess; its output is drained by a thread, the last lines kept."""

    def __init__(self, args, key: str):
        cmd = [
            sys.executable,
            "-m",
            "r1.cli",
            "serve",
            "--model",
            args.model,
            "--tokenizer",
            args.tokenizer,
            "--host",
            HOST,
            "--port",
            "0",
            "--max-model-len",
            "1024",
            *args.server_args,
        ]
        # The key goes in the environment, as the CLI advises: it stays out of the process list.
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "R1_API_KEY": key}
        )
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.url = None
        for line in self.proc.stdout:
            self.tail.append(line)
            if m := re.search(r"r1 serves .* at (http://\S+)", line):
                self.url = m.group(1)
                break
        if self.url is None or not self.url.startswith(f"http://{HOST}:"):
            self.stop()
            raise RuntimeError(f"r1 serve did not start on {HOST}:\n{''.join(self.tail)}")
        threading.Thread(target=lambda: self.tail.extend(self.proc.stdout), daemon=True).start()

    def stop(self) -> int:
        """SIGTERM, then wait. uvicorn re-raises the signal after its graceful shutdown: -15 is a clean exit."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--seconds", type=float, default=120, help="how long clients start new requests (default 120)")
    p.add_argument("--seed", type=int, default=0, help="seed of each client's mix and sampling seeds")
    p.add_argument("--timeout", type=float, default=60, help="client-side timeout of a request (default 60 s)")
    p.add_argument("--idle-timeout", type=float, default=60, help="how long the server may take to go idle after")
    p.add_argument("--model", default="demo-small")
    p.add_argument("--tokenizer", default="r1-tokenizer")
    p.add_argument("--save", default=None, metavar="PATH", help="also write the result as JSON")
    p.add_argument("server_args", nargs="*", help="more `r1 serve` options, after --, e.g. -- --threads 2")
    args = p.parse_args(argv)

    machine = bench.machine()  # before the server starts: the load average is the machine's other work
    key = secrets.token_urlsafe(16)
    print(f"starting r1 serve --model {args.model} ...", flush=True)
    server = Server(args, key)
    try:
        rss_start = rss_mib(server.proc.pid)
        print(f"{server.url}: {args.clients} clients for {args.seconds:g} s", flush=True)
        counts, seconds = asyncio.run(soak(server.url, key, args.clients, args.seconds, args.seed, args.timeout))
        idle, m = wait_idle(server.url, args.idle_timeout)
        rss_end = rss_mib(server.proc.pid)
    finally:
        stop_start = time.monotonic()
        exit_code = server.stop()
        stop_seconds = time.monotonic() - stop_start

    leaked = int(m["r1_kv_cache_blocks"] - m["r1_kv_cache_free_blocks"])
    # The engine's side: drops and aborts should show as requests finished by "abort".
    finished = {k.split('"')[1]: int(v) for k, v in m.items() if k.startswith("r1_requests_finished_total{")}
    total = sum(sum(c.values()) for c in counts.values())
    errors = {
        f"{kind}: {outcome}": n
        for kind, c in sorted(counts.items())
        for outcome, n in c.items()
        if outcome != "ok" and not outcome.startswith("4xx:")
    }
    failed = {k: n for k, n in errors.items() if k.split(":")[0] in WELL_FORMED}
    stopped = exit_code in (0, -signal.SIGTERM)
    passed = not failed and leaked == 0 and idle and stopped
    result = {
        "bench": "soak",
        "settings": {
            "model": args.model,
            "tokenizer": args.tokenizer,
            "clients": args.clients,
            "seconds": args.seconds,
            "seed": args.seed,
            "timeout": args.timeout,
            "server_args": args.server_args,
            "mix": MIX,
        },
        "requests": total,
        "wall_seconds": seconds,
        "requests_per_s": total / seconds,
        "outcomes": {kind: dict(c) for kind, c in sorted(counts.items())},
        "errors": errors,
        "well_formed_errors": sum(failed.values()),
        "idle": idle,
        "kv_cache_blocks": int(m["r1_kv_cache_blocks"]),
        "leaked_blocks": leaked,
        "engine_finished": finished,
        "rss_start_mib": rss_start,
        "rss_end_mib": rss_end,
        "server_exit_code": exit_code,
        "stop_seconds": stop_seconds,
        "passed": passed,
    }

    print(f"\n{total} requests in {seconds:.1f} s ({total / seconds:.1f}/s) from {args.clients} clients")
    for kind, c in sorted(counts.items()):
        outcomes = ", ".join(f"{o} x{n}" for o, n in c.most_common())
        print(f"  {kind:<28} {sum(c.values()):>6}  {outcomes}")
    print("errors of well-formed requests: " + (", ".join(f"{k} x{n}" for k, n in failed.items()) or "none"))
    unexpected = {k: n for k, n in errors.items() if k not in failed}
    print(
        "hostile requests not answered with a 4xx: " + (", ".join(f"{k} x{n}" for k, n in unexpected.items()) or "none")
    )
    print("engine requests finished by reason: " + ", ".join(f"{k} x{n}" for k, n in sorted(finished.items())))
    print(f"server idle after: {idle}; leaked KV blocks: {leaked} of {result['kv_cache_blocks']}")
    print(
        f"server RSS: {rss_start:.0f} MiB after loading, {rss_end:.0f} MiB at the end; "
        f"exit code after SIGTERM: {exit_code} ({'clean' if stopped else 'not clean'}, {stop_seconds:.1f} s)"
    )
    if not passed:
        print("".join(server.tail), end="", file=sys.stderr)  # the server's last words, for the failure
    if args.save:
        print(f"saved {bench.save(args.save, result, machine)}")
    print("PASSED" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
