"""r1 against llama.cpp and HF transformers: the same GGUF, the same token ids, one run.

Each engine gives three figures, greedy with eos ignored, after a warm-up of the same shape:
  prefill_tok_s  a 512-token prompt (prompt tokens over the time to the first token)
  decode_tok_s   batch 1: the tokens after the first over the seconds after the first
  output_tok_s   16 sequences at once, prompt 128 and 128 generated each (llama-batched-bench's
                 shape): generated tokens over wall seconds, prefill included
and r1's ratio to each peer (above 1: r1 is faster). r1 is measured by r1.bench; the peers copy
its protocol here. llama-bench is llama.cpp's own C++ tools, the reference: `llama-bench` for
prefill (pp) and batch-1 decode (tg), `llama-batched-bench` for the batched figure (its
generated tokens over its wall seconds), built natively from the llama.cpp that the
llama-cpp-python sdist vendors (bench/README.md says how; --llama-bin names its bin folder).
llama.cpp runs through llama-cpp-python's low-level API, which adds the binding's Python loop:
one context holds every sequence, several sequences share each llama_batch, and the next token
is a numpy argmax of the logits. transformers dequantizes the GGUF to fp32 (about 100 s to load
the 1.5B). Engines run one after another, each freed before the next loads. Batch-1 decode is
also given as a fraction of the bus: tok/s x weight bytes a token read / the machine's measured
read bandwidth (bench.machine()).

    python bench/compare.py                                 # the demo stand-in, both peers, 2 threads
    python bench/compare.py --peers llama-bench --llama-bin ../llama-work/build/bin   # llama.cpp's own tools
    python bench/compare.py --peers llama.cpp --quant int4 --save bench/results/compare_demo_int4.json
    python bench/compare.py --peers "" --baseline HEAD~3 --repeats 3   # r1 against an older r1 (A/B)
    python bench/compare.py --peers llama.cpp --kv-dtype int8 --prompt-len 8192 --output-len 64 --num-seqs 1 \
        --batch-prompt-len 16 --batch-output-len 16        # decode deep in a long reasoning trace
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from r1 import bench, options
from r1.loaders import open_model_files, resolve_path

PEERS = ("llama-bench", "llama.cpp", "transformers")
FIGURES = {
    "prefill_tok_s": "prefill tok/s",
    "decode_tok_s": "decode tok/s (batch 1)",
    "output_tok_s": "batched output tok/s",
}
RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Workload:
    prompt_len: int
    output_len: int
    repeats: int
    num_seqs: int
    batch_prompt_len: int
    batch_output_len: int
    seed: int
    vocab_size: int

    def batch(self) -> tuple[list[list[int]], list[int]]:
        return bench.throughput_workload(
            self.num_seqs, (self.batch_prompt_len,) * 2, (self.batch_output_len,) * 2, self.vocab_size, self.seed
        )


# ---- the protocol, for a peer given as two functions -------------------------------------------


def measure(generate, generate_batch, work: Workload) -> dict:
    """generate(prompt, n) -> (seconds to the first token, seconds after it);
    generate_batch(prompts, n) -> tokens generated, all sequences at once."""
    warm, prefill_prompts, decode_prompts = bench.latency_prompts(
        work.prompt_len, work.repeats, work.vocab_size, work.seed
    )
    generate(warm, bench.WARMUP_TOKENS)
    prefill = statistics.median(generate(p, 1)[0] for p in prefill_prompts)
    decode = statistics.median(generate(p, work.output_len)[1] for p in decode_prompts)
    prompts, output_lens = work.batch()
    generate_batch(bench.throughput_warmup(work.num_seqs, work.vocab_size, work.seed), bench.WARMUP_TOKENS)
    start = time.perf_counter()
    total = generate_batch(prompts, output_lens[0])
    seconds = time.perf_counter() - start
    return {
        "prefill_seconds": prefill,
        "prefill_tok_s": work.prompt_len / prefill,
        "decode_seconds": decode,
        "decode_tok_s": (work.output_len - 1) / decode,
        "batch_seconds": seconds,
        "total_output_tokens": total,
        "output_tok_s": total / seconds,
    }


def run_r1(model: str, args, work: Workload) -> dict:
    from r1 import LLM

    llm = LLM(
        model,
        dtype=args.dtype,
        device="cpu",
        threads=args.threads,
        quant=args.quant,
        kv_dtype=args.kv_dtype,
        progress=False,
    )
    read_bytes = bench.decode_read_bytes(llm.model)
    lat = bench.latency(llm, work.prompt_len, work.output_len, work.repeats, work.seed)
    thr = bench.throughput(llm, *work.batch(), temperature=0.0, seed=work.seed)
    return {
        **bench.engine_settings(llm, model),
        "load_seconds": llm.load_seconds,
        **{k: lat[k] for k in ("prefill_seconds", "prefill_tok_s", "decode_seconds", "decode_tok_s")},
        "batch_seconds": thr["seconds"],
        "total_output_tokens": thr["total_output_tokens"],
        "output_tok_s": thr["output_tok_s"],
        "decode_read_bytes": read_bytes,
    }


def run_baseline(rev: str, argv: list[str]) -> dict:
    """r1 as of git revision rev, measured by that revision's own compare.py (same arguments, no
    peers) in a temporary worktree, so that a change is A/B-tested in one run on one machine."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "r1"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True, capture_output=True
        )
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "bench/compare.py",
                    *argv,
                    "--peers",
                    "",
                    "--json",
                    "--save",
                    str(Path(tmp) / "baseline.json"),
                ],
                cwd=tree,
                check=True,
                env={**os.environ, "PYTHONPATH": str(tree)},
                capture_output=True,
                text=True,
            )
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    return {"revision": rev, **json.loads(done.stdout.strip().splitlines()[-1])["engines"]["r1"]}


# ---- llama.cpp's own tools ---------------------------------------------------------------------


def run_llama_bench(path: Path, args, work: Workload) -> dict:
    if not args.llama_bin:
        raise SystemExit("the llama-bench peer needs --llama-bin (llama.cpp's build/bin; bench/README.md)")
    bin_dir, threads = Path(args.llama_bin), str(args.threads)
    single = [str(bin_dir / "llama-bench"), "-m", str(path), "-t", threads, "-o", "json"]
    single += ["-p", str(work.prompt_len), "-n", str(work.output_len), "-r", str(max(2, work.repeats))]
    rows = json.loads(subprocess.run(single, capture_output=True, text=True, check=True).stdout)
    prefill = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    decode = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    ctx = work.num_seqs * (work.batch_prompt_len + work.batch_output_len)
    batched = [str(bin_dir / "llama-batched-bench"), "-m", str(path), "-t", threads, "--output-format", "jsonl"]
    batched += ["-npp", str(work.batch_prompt_len), "-ntg", str(work.batch_output_len), "-npl", str(work.num_seqs)]
    batched += ["-c", str(-(-ctx // 256) * 256)]
    out = subprocess.run(batched, capture_output=True, text=True, check=True).stdout
    row = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    generated = row["pl"] * row["tg"]
    return {
        "commands": [" ".join(single), " ".join(batched)],
        "build_commit": prefill.get("build_commit"),
        "threads": args.threads,
        "kv_cache": "f16",
        "prefill_seconds": work.prompt_len / prefill["avg_ts"],
        "prefill_tok_s": prefill["avg_ts"],
        "decode_seconds": work.output_len / decode["avg_ts"],
        "decode_tok_s": decode["avg_ts"],
        "batch_seconds": row["t"],
        "total_output_tokens": generated,
        "output_tok_s": generated / row["t"],
        "decode_read_bytes": bench.gguf_decode_read_bytes(path),
    }


# ---- llama.cpp through llama-cpp-python ---------------------------------------------------------


class LlamaCpp:
    """One llama.cpp context with a KV buffer shared by up to n_seq_max sequences."""

    N_BATCH = 512  # tokens per llama_decode call, as llama-bench and llama-cpp-python default

    def __init__(self, path: Path, threads: int, n_ctx: int, n_seq_max: int):
        import llama_cpp as lc

        self.lc = lc
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # kept: C holds the pointer
        lc.llama_log_set(self._quiet, None)
        lc.llama_backend_init()
        model_params = lc.llama_model_default_params()
        # A llama.cpp built on an AMX CPU (Intel Xeon since Sapphire Rapids) moves Q4_K weights into
        # its AMX buffers, whose matmul segfaults on the first batch (llama.cpp#20824; 0.3.36 here).
        # Such a build runs without its extra buffer types, REPACK's included; a build without AMX
        # (CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON ...") keeps REPACK. The record says which.
        self.system_info = lc.llama_print_system_info().decode().strip()  # the CPU features it was built for
        self.extra_buffers = "AMX_INT8 = 1" not in self.system_info
        model_params.use_extra_bufts = self.extra_buffers
        self.model = lc.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = lc.llama_context_default_params()
        params.n_ctx, params.n_seq_max = n_ctx, n_seq_max
        params.n_batch = params.n_ubatch = self.N_BATCH
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True  # the sequences share n_ctx cells, rather than n_ctx / n_seq_max each
        self.ctx = lc.llama_init_from_model(self.model, params)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(self.N_BATCH, 0, 1)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """Run (token, position, sequence, wants next token) entries; greedy next tokens, in order."""
        import numpy as np

        lc, b, out = self.lc, self.batch, []
        for start in range(0, len(entries), self.N_BATCH):
            chunk = entries[start : start + self.N_BATCH]
            b.n_tokens = len(chunk)
            for i, (token, pos, seq, wants) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, wants
                b.seq_id[i][0] = seq
            if (rc := lc.llama_decode(self.ctx, b)) != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            for i, (*_, wants) in enumerate(chunk):
                if wants:
                    logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                    out.append(int(logits.argmax()))
        return out

    def generate_batch(self, prompts: list[list[int]], n: int) -> int:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        next_ids = self._decode([(t, i, s, i == len(p) - 1) for s, p in enumerate(prompts) for i, t in enumerate(p)])
        for step in range(n - 1):  # every sequence emits one token per step
            next_ids = self._decode([(t, len(p) + step, s, True) for s, (t, p) in enumerate(zip(next_ids, prompts))])
        return n * len(prompts)

    def generate(self, prompt: list[int], n: int) -> tuple[float, float]:
        start = time.perf_counter()
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        (token,) = self._decode([(t, i, 0, i == len(prompt) - 1) for i, t in enumerate(prompt)])
        first = time.perf_counter()
        for step in range(n - 1):
            (token,) = self._decode([(token, len(prompt) + step, 0, True)])
        return first - start, time.perf_counter() - first


def run_llama_cpp(path: Path, args, work: Workload) -> dict:
    import llama_cpp

    n_ctx = max(work.prompt_len + work.output_len, work.num_seqs * (work.batch_prompt_len + work.batch_output_len))
    start = time.perf_counter()
    engine = LlamaCpp(path, args.threads, -(-n_ctx // 256) * 256, work.num_seqs)
    load_seconds = time.perf_counter() - start
    try:
        figures = measure(engine.generate, engine.generate_batch, work)
    finally:
        engine.close()
    # llama.cpp's default KV cache: f16 keys and values (r1's figure is with --kv-dtype)
    return {
        "version": llama_cpp.__version__,
        "threads": args.threads,
        "kv_cache": "f16",
        "system_info": engine.system_info,
        "extra_buffers": engine.extra_buffers,
        "load_seconds": load_seconds,
        **figures,
    }


# ---- transformers ------------------------------------------------------------------------------


def run_transformers(path: Path, args, work: Workload) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        """generate() puts the prompt, then each new token: the times of those puts."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if path.is_file():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    load_seconds = time.perf_counter() - start
    # min_new_tokens = max_new_tokens: eos is masked until the length is reached (ignore_eos).
    options = dict(do_sample=False, pad_token_id=0)

    def generate(prompt, n):
        clock = TokenClock()
        start = time.perf_counter()
        model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            streamer=clock,
            **options,
        )
        return clock.times[1] - start, clock.times[-1] - clock.times[1]

    def generate_batch(prompts, n):
        ids = torch.tensor(prompts)  # all one length: no padding needed
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **options)
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    with torch.inference_mode():
        figures = measure(generate, generate_batch, work)
    return {
        "version": transformers.__version__,
        "dtype": "float32",
        "threads": args.threads,
        "load_seconds": load_seconds,
        **figures,
    }


# ---- report ------------------------------------------------------------------------------------


def print_table(engines: dict, ratios: dict, work: Workload) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title=f"prompt {work.prompt_len}, decode {work.output_len}; batched: {work.num_seqs} sequences x "
        f"(prompt {work.batch_prompt_len}, output {work.batch_output_len})",
        title_justify="left",
    )
    t.add_column("")
    for name in engines:
        t.add_column(name, justify="right")
    for peer in ratios:
        t.add_column(f"r1 / {peer}", justify="right")
    for key, label in FIGURES.items():
        t.add_row(label, *(f"{e[key]:.2f}" for e in engines.values()), *(f"{r[key]:.2f}x" for r in ratios.values()))
    shares = [e.get("decode_bus_fraction") for e in engines.values()]
    if any(shares):
        t.add_row("decode, share of the bus", *(f"{x:.0%}" if x else "" for x in shares), *([""] * len(ratios)))
    # Piped output gets rich's 80 columns, too narrow for five columns of figures.
    Console(highlight=False, width=None if sys.stdout.isatty() else 120).print(t)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="demo", help="a .gguf file or demo / demo-small (default: demo, the 1.5B stand-in)"
    )
    p.add_argument(
        "--peers",
        default=None,
        help=f"comma-separated, of {', '.join(PEERS)} (default: all; llama-bench only with --llama-bin)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--llama-bin",
        default=os.environ.get("LLAMA_CPP_BIN"),
        help="llama.cpp's build/bin, for the llama-bench peer (default: $LLAMA_CPP_BIN)",
    )
    p.add_argument(
        "--quant",
        default="int4",
        choices=options.QUANT_MODES,
        help="r1's weight-only quantization (default int4: the peer of llama.cpp's Q4_K_M)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", *options.DTYPES], help="r1's dtype")
    p.add_argument(
        "--kv-dtype",
        default="auto",
        choices=options.KV_CACHE_DTYPES,
        help="r1's KV cache (llama.cpp keeps its default, f16)",
    )
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="latency runs after the warm-up; the median is kept")
    p.add_argument("--num-seqs", type=int, default=16, help="concurrent sequences of the batched figure")
    p.add_argument("--batch-prompt-len", type=int, default=128)
    p.add_argument("--batch-output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, metavar="PATH", help="default: bench/results/compare_MODEL.json")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object instead of a table")
    p.add_argument(
        "--baseline", default=None, metavar="REV", help="also measure r1 as of this git revision, as the peer r1@REV"
    )
    args = p.parse_args(argv)
    if args.peers is None:
        args.peers = ",".join(p for p in PEERS if p != "llama-bench" or args.llama_bin)
    peers = [x for x in args.peers.split(",") if x]
    if unknown := set(peers) - set(PEERS):
        p.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    if args.output_len < 2 or args.batch_output_len < 1:
        p.error("--output-len must be at least 2 and --batch-output-len at least 1")

    machine = bench.machine()  # before any load: the load average is the machine's other work
    path = resolve_path(args.model)
    work = Workload(
        args.prompt_len,
        args.output_len,
        args.repeats,
        args.num_seqs,
        args.batch_prompt_len,
        args.batch_output_len,
        args.seed,
        open_model_files(args.model).config.vocab_size,
    )
    runners = {
        "r1": lambda: run_r1(args.model, args, work),
        "llama-bench": lambda: run_llama_bench(path, args, work),
        "llama.cpp": lambda: run_llama_cpp(path, args, work),
        "transformers": lambda: run_transformers(path, args, work),
    }
    if args.baseline:
        same = [
            f"--{name.replace('_', '-')}={getattr(args, name)}"
            for name in (
                "model",
                "threads",
                "quant",
                "dtype",
                "kv_dtype",
                "prompt_len",
                "output_len",
                "repeats",
                "num_seqs",
                "batch_prompt_len",
                "batch_output_len",
                "seed",
            )
        ]
        peers.append(f"r1@{args.baseline}")
        runners[peers[-1]] = lambda: run_baseline(args.baseline, same)
    engines = {}
    for name in ["r1", *peers]:
        if not args.json:
            print(f"running {name} ...", flush=True)
        engines[name] = runners[name]()
        gc.collect()  # free this engine's weights before the next one loads
    for figures in engines.values():
        if "decode_read_bytes" in figures:
            figures["decode_bus_fraction"] = bench.bus_fraction(
                figures["decode_tok_s"], figures["decode_read_bytes"], machine
            )
    ratios = {peer: {k: engines["r1"][k] / engines[peer][k] for k in FIGURES} for peer in peers}
    result = {
        "settings": {"model": args.model, "path": str(path), "peers": peers, **asdict(work)},
        "engines": engines,
        "ratios": ratios,
    }
    saved = bench.save(args.save or RESULTS / f"compare_{Path(args.model).stem}.json", result, machine)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(engines, ratios, work)
        print(f"saved {saved}")
    return result


if __name__ == "__main__":
    main()
