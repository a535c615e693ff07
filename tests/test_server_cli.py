"""`r1 serve` as a user runs it: one command loads the model, prints where it listens, serves a
ChatML model (no reasoning: everything is `content`), and stops promptly on SIGTERM while a
client is streaming, cutting that stream rather than hanging."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx2
import openai
import pytest


def _lines(pipe, sink: queue.Queue) -> None:
    for line in pipe:
        sink.put(line)
    sink.put(None)


def test_serve_answers_then_stops_on_sigterm_mid_stream():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "r1.cli",
            "serve",
            "--model",
            "demo-small",
            "--port",
            "0",
            "--max-model-len",
            "512",
            "--kv-cache-tokens",
            "2048",
            "--served-model-name",
            "small",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    try:
        url, log = None, []
        while url is None:
            line = out.get(timeout=240)
            assert line is not None, "r1 serve exited:\n" + "".join(log)
            log.append(line)
            if match := re.search(r"at (http://127\.0\.0\.1:\d+) ", line):
                url = match.group(1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        r = client.chat.completions.create(
            model="small", max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Say hello."}]
        )
        message = r.choices[0].message
        assert message.content and message.reasoning_content is None

        stream = client.chat.completions.create(
            model="small",
            max_tokens=400,
            stream=True,
            messages=[{"role": "user", "content": "Count to 500."}],
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        while not next(chunks).choices[0].delta.content:
            pass
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        with pytest.raises((openai.APIError, httpx2.HTTPError)):  # cut after the grace period
            for _ in chunks:
                pass
        assert proc.wait(timeout=60) == -signal.SIGTERM
        assert time.monotonic() - start < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
