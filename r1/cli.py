"""The `r1` command: a thin shell over `LLM` (generate, chat) and the config (info).

Owns argument parsing and terminal presentation only: reasoning dimmed, then the answer, then the
token counts and speeds. Errors the user can fix are printed as one line, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.markup import escape

from r1 import options
from r1.loaders import hub

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=hub.DEFAULT_MODEL,
        help="HF folder, hub id, .gguf file, or demo / demo-small (offline stand-ins)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="use this tokenizer and chat template instead of the model's (HF folder, hub id, .gguf)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", *options.DTYPES])
    p.add_argument("--device", default="auto", choices=["auto", *options.DEVICES])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument(
        "--quant",
        default="none",
        choices=options.QUANT_MODES,
        help="weight-only quantization of the linears: int8 per channel; int4 group-wise, with 6 bits "
        "where a GGUF file keeps more than 4.5 (a Q4_K_M's Q6_K tensors) or, for float weights, where "
        "llama.cpp's Q4_K_M recipe does (the head, half of attn_v and ffn_down); int4-pure: 4 bits everywhere "
        "(`r1 memory --per-tensor` shows the plan)",
    )
    p.add_argument(
        "--kv-dtype",
        default="auto",
        choices=options.KV_CACHE_DTYPES,
        help="the KV cache: auto (the model's dtype), bf16 (half of fp32's memory, as llama.cpp's "
        "f16 default) or int8 (a scale per token and head: a quarter of fp32's memory); both "
        "decode long contexts faster on a CPU",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="on a GPU, run decode steps without CUDA graphs (slower at small batches; to compare)",
    )
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="launch each step's forward before the last step's tokens are read, so the host's "
        "work overlaps the GPU's (default: on a GPU)",
    )
    p.add_argument(
        "--cpu-kernels",
        default="auto",
        choices=options.CPU_KERNELS,
        help="r1's CPU kernels: auto (the widest build this CPU runs), off (PyTorch's paths) or "
        "one build ($R1_KERNELS overrides)",
    )
    p.add_argument(
        "--speculative",
        default=None,
        metavar="ngram|draft:MODEL",
        help="speculative decoding: guesses of the next tokens, checked in one forward (the output "
        "is unchanged): ngram looks them up in the prompt and the output so far; draft:MODEL has a "
        "smaller model of the same tokenizer write them (e.g. draft:demo-small for demo)",
    )
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="the most guesses per step")
    p.add_argument(
        "--speculative-draft-quant",
        default=None,
        choices=options.QUANT_MODES,
        help="the draft model's weight quantization (default: int4-pure where --quant is an int4, "
        "otherwise --quant's): its guesses need only be cheap, the output never changes",
    )
    p.add_argument(
        "--speculative-disable-by-batch-size",
        type=int,
        default=4,
        help="no guesses in steps with at least this many running sequences",
    )
    p.add_argument(
        "--gpu-layer-ops",
        action="store_true",
        help="on a GPU, run norms, rotary with the KV write, SwiGLU and prefill attention on r1's Triton kernels "
        "($R1_GPU_LAYER_OPS=on)",
    )


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's, R1 0.6)")
    p.add_argument("--top-p", type=float, default=None, help="default: the model's (R1 0.95)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def _params(a: argparse.Namespace):
    from r1.sampling_params import SamplingParams

    return SamplingParams(
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        min_p=a.min_p,
        repetition_penalty=a.repetition_penalty,
        max_tokens=a.max_tokens,
        seed=a.seed,
        stop=a.stop,
    )


def _build_llm(a: argparse.Namespace, progress: bool = True, **engine_options):
    """The LLM that _model_args describes; subcommands add their own engine options."""
    from r1.llm import LLM

    return LLM(
        a.model,
        tokenizer=a.tokenizer,
        dtype=a.dtype,
        device=a.device,
        threads=a.threads,
        max_model_len=a.max_model_len,
        quant=a.quant,
        kv_dtype=a.kv_dtype,
        enforce_eager=a.enforce_eager,
        async_scheduling=a.async_scheduling,
        cpu_kernels=a.cpu_kernels,
        gpu_layer_ops=a.gpu_layer_ops,
        speculative=a.speculative,
        num_speculative_tokens=a.num_speculative_tokens,
        speculative_disable_by_batch_size=a.speculative_disable_by_batch_size,
        speculative_draft_quant=a.speculative_draft_quant,
        progress=progress,
        **engine_options,
    )


def _load(a: argparse.Namespace, quiet: bool = False, **engine_options):
    """_build_llm, saying on stderr what is loading and what it became (unless quiet)."""
    if not quiet:
        err.print(f"[dim]loading {escape(a.model)} ...[/dim]")
    llm = _build_llm(a, progress=not quiet, **engine_options)
    if not quiet:
        err.print(
            f"[dim]loaded in {llm.load_seconds:.1f}s: {llm.device.type}, "
            f"{str(llm.dtype).removeprefix('torch.')}, "
            f"context {llm.engine.max_model_len} tokens[/dim]"
        )
    return llm


def _stream_answer(llm, prompt, params, chat: bool):
    """Print reasoning (dimmed) then the answer as they arrive; return the last output and the text."""
    in_reasoning, text, last = False, [], None
    for o in llm.stream(prompt, params, chat=chat):
        if o.delta_reasoning:
            if not in_reasoning:
                out.print("Thinking...", style="bold dim")
                in_reasoning = True
            out.print(o.delta_reasoning, style="dim", end="", markup=False)
        if o.delta_answer:
            if in_reasoning:
                out.print("\n" + "-" * 40, style="dim")
                in_reasoning = False
            out.print(o.delta_answer, end="", markup=False)
        text.append(o.delta_text)
        last = o
    out.print()
    return last, "".join(text)


def _stats(o) -> str:
    prefill = o.num_prompt_tokens / o.time_to_first_token if o.time_to_first_token else 0.0
    decode = (o.num_output_tokens - 1) / o.decode_seconds if o.decode_seconds and o.num_output_tokens > 1 else 0.0
    return (
        f"prompt {o.num_prompt_tokens} tokens ({prefill:.1f} tok/s), generated {o.num_output_tokens} tokens "
        f"({decode:.1f} tok/s), finish: {o.finish_reason}"
    )


def cmd_generate(a: argparse.Namespace) -> None:
    llm = _load(a, quiet=a.json)
    params = _params(a)
    prompt = a.prompt if a.raw else [{"role": "user", "content": a.prompt}]
    if a.json:
        c = (llm.generate(prompt, params) if a.raw else llm.chat(prompt, params))[0]
        print(
            json.dumps(
                {
                    "text": c.text,
                    "reasoning": c.reasoning,
                    "answer": c.answer,
                    "prompt_token_ids": c.prompt_token_ids,
                    "token_ids": c.token_ids,
                    "finish_reason": c.finish_reason,
                    "usage": {
                        "prompt_tokens": c.usage["prompt_tokens"],
                        "completion_tokens": c.usage["completion_tokens"],
                    },
                    "timing": c.timing,
                },
                ensure_ascii=False,
            )
        )
        return
    last, _ = _stream_answer(llm, prompt, params, chat=not a.raw)
    err.print(f"[dim]{_stats(last)}[/dim]")


def cmd_chat(a: argparse.Namespace) -> None:
    llm = _load(a)
    params = _params(a)
    history: list[dict] = []
    err.print("[dim]/reset clears the conversation, /exit quits[/dim]")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line == "/exit":
            break
        if line == "/reset":
            history.clear()
            err.print("[dim]conversation cleared[/dim]")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        last, text = _stream_answer(llm, history, params, chat=True)
        # The full text goes back into the history; the template drops its reasoning.
        history.append({"role": "assistant", "content": text})
        err.print(f"[dim]{_stats(last)}[/dim]")


def cmd_info(a: argparse.Namespace) -> None:
    from r1.info import model_info

    info = model_info(a.model)
    if a.json:
        print(json.dumps(info, ensure_ascii=False))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        out.print(f"{key:<{width}}  {value}", markup=False)


def cmd_serve(a: argparse.Namespace) -> None:
    import os

    from r1.server.app import ServerConfig, check_exposure, host_allowlist, serve

    # The environment keeps the key out of the process list.
    api_key = (a.api_key or os.environ.get("R1_API_KEY") or "").strip() or None  # an empty one is none
    check_exposure(a.host, api_key, a.insecure)  # before the minutes a load can take
    llm = _load(a, max_num_seqs=a.max_num_seqs, kv_cache_tokens=a.kv_cache_tokens)
    config = ServerConfig(
        served_model_name=a.served_model_name or a.model,
        api_key=api_key,
        max_requests=a.max_requests,
        allowed_hosts=host_allowlist(a.host, api_key, tuple(a.allowed_host)),
        cors_origins=tuple(a.cors_origin),
    )
    serve(llm, config, host=a.host, port=a.port, insecure=a.insecure)


def cmd_eval(a: argparse.Namespace) -> None:
    import re
    from pathlib import Path

    from r1.eval.data import TASKS, find_data, read_problems
    from r1.eval.report import EvalProgress, summary_table
    from r1.eval.runner import EvalSettings, check_out_dir, run_eval

    if a.task is None:
        raise ValueError(f"r1 eval needs --task ({', '.join(TASKS)}); to print a finished run: r1 eval report DIR")
    for name in ("samples", "limit", "max_tokens"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    settings = EvalSettings(a.task, a.samples or TASKS[a.task].samples, a.max_tokens, a.temperature, a.top_p, a.seed)
    model_name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(a.model).name)
    out_dir = Path(a.out or f"r1-eval/{a.task}-{model_name}")
    check_out_dir(out_dir, a.resume)
    data_path = find_data(a.task, a.data)
    problems = read_problems(data_path)[: a.limit]
    err.print(
        f"[dim]{a.task}: {len(problems)} problems x {settings.samples} samples from {escape(str(data_path))}; "
        f"loading {escape(a.model)} ...[/dim]"
    )
    llm = _build_llm(a, max_num_seqs=a.max_num_seqs, kv_cache_tokens=a.kv_cache_tokens)
    if llm.engine.max_model_len < settings.max_tokens + 2048:
        err.print(
            f"[yellow]the context holds {llm.engine.max_model_len} tokens: a sample whose prompt plus "
            f"{settings.max_tokens} new tokens exceeds it stops early and counts as cut off[/yellow]"
        )
    try:
        with EvalProgress(err, a.task) as progress:
            summary = run_eval(
                llm,
                problems,
                settings,
                out_dir,
                data_path=data_path,
                resume=a.resume,
                tokenizer=a.tokenizer,
                progress=progress,
            )
    except KeyboardInterrupt:
        err.print(f"[dim]finished samples are saved in {escape(str(out_dir))}; rerun with --resume to go on[/dim]")
        raise
    out.print(summary_table(summary, json.loads((out_dir / "manifest.json").read_text())))
    err.print(f"[dim]wrote {escape(str(out_dir))}/: samples.jsonl, manifest.json, summary.json[/dim]")


def cmd_eval_report(a: argparse.Namespace) -> None:
    from pathlib import Path

    from r1.eval.report import compare_table, load_run, summary_table

    runs = [(Path(d).name or str(d), *load_run(d)) for d in a.dirs]
    if len(runs) == 1:
        out.print(summary_table(runs[0][1], runs[0][2]))
    else:
        out.print(compare_table(runs))


def _print_weight_plans(a: argparse.Namespace, source, quants: list[str]) -> None:
    """Each linear's format and bytes under r1's quants (memory.weight_plan)."""
    from r1 import memory

    plans = {
        q: memory.weight_plan(source.config, q, a.device, source.source_types) for q in quants if q in memory.R1_QUANTS
    }
    if not plans:
        raise SystemExit(f"--per-tensor shows r1's formats: --quant {', '.join(memory.R1_QUANTS)}")
    if a.json:
        rows = lambda plan: [  # noqa: E731
            {"name": n, "shape": list(shape), "stored": stored, "format": fmt, "bytes": nbytes}
            for n, shape, stored, fmt, nbytes in plan
        ]
        print(json.dumps({"model": a.model, "device": a.device, "plans": {q: rows(p) for q, p in plans.items()}}))
        return
    for q, plan in plans.items():
        out.print(
            f"{escape(a.model)} --quant {q} on {a.device}: {sum(r[-1] for r in plan) / 2**20:,.1f} MiB of linears"
        )
        width = max(len(fmt) for *_, fmt, _ in plan)
        for name, shape, stored, fmt, nbytes in plan:
            out.print(
                f"  {name:<36} {'x'.join(map(str, shape)):>12} {stored:>6} -> {escape(fmt):<{width}} {nbytes:>12,} B"
            )


def cmd_memory(a: argparse.Namespace) -> None:
    from rich.table import Table

    from r1 import memory

    source = memory.model_source(a.model)
    options = dict(batch=a.batch, device=a.device, kv_dtype=a.kv_dtype)
    quants = a.quant or ([memory.compute_dtype("", a.device)] if a.context is not None else list(memory.SWEEP_QUANTS))
    note = f" ({source.note})" if source.note else ""
    if a.per_tensor:
        _print_weight_plans(a, source, quants)
        return
    if a.fit:
        budget = memory.parse_size(a.fit)
        fits = {q: memory.fit_context(source, q, budget, **options) for q in quants}
        if a.json:
            print(
                json.dumps(
                    {"model": a.model, "device": a.device, "batch": a.batch, "fit_bytes": budget, "max_context": fits}
                )
            )
            return
        out.print(
            f"largest context per sequence that fits {budget / memory.GiB:.2f} GiB on {a.device}, "
            f"batch {a.batch}, {escape(a.model)}{note}:"
        )
        for q, n in fits.items():
            out.print(f"  {q:<8} {f'{n:,} tokens' if n else 'does not fit'}")
        return
    if a.context is not None:
        plans = [memory.plan(source, q, a.context, **options) for q in quants]
        if a.json:
            print(json.dumps(plans[0].to_dict() if len(plans) == 1 else [p.to_dict() for p in plans]))
            return
        for p in plans:
            t = Table(
                title=f"{escape(a.model)}{note}: {p.quant}, context {p.context:,} x batch {p.batch}, "
                f"KV {p.kv_dtype}, {p.device}",
                title_justify="left",
            )
            t.add_column("")
            t.add_column("GiB", justify="right")
            t.add_column("formula", overflow="fold")
            for line in [*p.lines, *([p.loading] if p.loading else [])]:
                t.add_row(line.name, f"{line.gib:.3f}", escape(line.formula))
            t.add_row(
                "total",
                f"[bold]{p.total / memory.GiB:.3f}[/bold]",
                "max(serving, loading - reclaimable pages)" if p.loading else "sum of the lines",
            )
            if p.loading:
                t.add_row("peak RSS", f"{p.peak_rss / memory.GiB:.3f}", "what getrusage reports: max(serving, loading)")
            out.print(t)
        return
    table = memory.sweep(source, quants, **options)
    if a.plot:
        memory.plot_sweep(table, a.plot, f"{a.model} on {a.device}, batch {a.batch}")
    if a.json:
        print(
            json.dumps(
                {
                    "model": a.model,
                    "device": a.device,
                    "batch": a.batch,
                    "contexts": memory.SWEEP_CONTEXTS,
                    "total_gib": {
                        q: [round(p.total / memory.GiB, 3) if p else None for p in plans] for q, plans in table.items()
                    },
                }
            )
        )
        return
    t = Table(title=f"total GiB, {escape(a.model)}{note}, {a.device}, batch {a.batch}", title_justify="left")
    t.add_column("context")
    for q in table:
        t.add_column(q, justify="right")
    for i, c in enumerate(memory.SWEEP_CONTEXTS):
        cells = (f"{plans[i].total / memory.GiB:.2f}" if plans[i] else "-" for plans in table.values())
        t.add_row(f"{c // 1024}K", *cells)
    out.print(t)
    if a.device == "cuda":
        g = Table(title="largest context that fits each GPU (nominal memory)", title_justify="left")
        g.add_column("GPU")
        for q in table:
            g.add_column(q, justify="right")
        for name, size in memory.GPUS.items():
            fits = (memory.fit_context(source, q, size, **options) for q in table)
            g.add_row(name, *(f"{n:,}" if n else "no" for n in fits))
        out.print(g)
    if a.plot:
        err.print(f"[dim]plot written to {escape(a.plot)}[/dim]")


def _saved_or_printed_json(a: argparse.Namespace, result: dict, machine: dict) -> bool:
    """Save a bench result where --save says; with --json print it as the only stdout and say so."""
    from r1 import bench

    if a.save:
        path = bench.save(a.save, result, machine)
        if not a.json:
            err.print(f"[dim]saved {escape(str(path))}[/dim]")
    if a.json:
        print(json.dumps(result))
    return a.json


def cmd_bench(a: argparse.Namespace) -> None:
    from r1 import bench

    machine = bench.machine()  # before loading: its load average is the other work on the machine
    llm = _load(a, quiet=a.json)
    result = {"bench": a.bench, **bench.engine_settings(llm, a.model), "seed": a.seed}
    if a.bench == "latency":
        result |= bench.latency(llm, a.prompt_len, a.output_len, a.repeats, a.seed)
        summary = (
            f"prefill {result['prompt_tokens']} tokens: {result['prefill_tok_s']:.1f} tok/s "
            f"({result['prefill_seconds']:.2f} s)   decode {result['output_tokens']} tokens at batch 1: "
            f"{result['decode_tok_s']:.1f} tok/s"
        )
    else:
        prompts, output_lens = bench.throughput_workload(
            a.num_seqs, (a.min_input, a.max_input), (a.min_output, a.max_output), llm.config.vocab_size, a.seed
        )
        result |= {
            "min_input": a.min_input,
            "max_input": a.max_input,
            "min_output": a.min_output,
            "max_output": a.max_output,
        }
        result |= bench.throughput(llm, prompts, output_lens, a.temperature, a.seed)
        summary = (
            f"{result['num_seqs']} sequences, {result['total_input_tokens']} prompt tokens, "
            f"{result['total_output_tokens']} generated in {result['seconds']:.1f} s: "
            f"{result['output_tok_s']:.1f} output tok/s"
        )
    result |= bench.speculation(llm)
    if result.get("spec_rounds"):
        summary += (
            f"   guesses kept {result['spec_acceptance_rate']:.0%}, "
            f"{result['spec_mean_accepted']:.2f} tokens a verifying step"
        )
    if _saved_or_printed_json(a, result, machine):
        return
    out.print(f"{a.bench}: {escape(a.model)}, {result['quant']}, {result['dtype']}, {result['threads']} threads")
    out.print(summary)


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(n) for n in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def cmd_bench_host(a: argparse.Namespace) -> None:
    from rich.table import Table

    from r1 import bench, bench_host
    from r1.llm import load_tokenizer
    from r1.loaders import open_model_files

    machine = bench.machine()
    tokenizer = load_tokenizer(None, open_model_files(a.model))
    rows = bench_host.host_table(tokenizer, a.sizes, a.output_len)
    result = {
        "bench": "host",
        "model": a.model,
        "output_len": a.output_len,
        "host_vocab": bench_host.HOST_VOCAB,
        "rows": rows,
        "sampler_256_rows_ms": {
            "greedy": bench_host.sampler_ms(sampled=False),
            "sampled": bench_host.sampler_ms(sampled=True),
            "sampled_host_vocab": bench_host.sampler_ms(vocab=bench_host.HOST_VOCAB),
        },
    }
    if _saved_or_printed_json(a, result, machine):
        return
    t = Table(title=f"host ms per decode step, {escape(machine['cpu'])}", title_justify="left")
    for name in ("sequences", "sampling", "outputs", "ms a step", "us a sequence"):
        t.add_column(name, justify="right")
    for r in rows:
        t.add_row(
            str(r["num_seqs"]),
            "T 0.6, top-p 0.95" if r["sampled"] else "greedy",
            "streamed" if r["stream"] else "final only",
            f"{r['host_ms_per_step']:.3f}",
            f"{r['host_us_per_seq']:.1f}",
        )
    out.print(t)
    s = result["sampler_256_rows_ms"]
    out.print(
        f"the sampler alone over 256 rows of {tokenizer.vocab_size:,} logits: greedy {s['greedy']:.1f} ms, "
        f"T 0.6 / top-p 0.95 {s['sampled']:.1f} ms; over the {bench_host.HOST_VOCAB} columns above, sampled: "
        f"{s['sampled_host_vocab']:.2f} ms"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1", description="Run DeepSeek-R1-Distill-Qwen-1.5B locally.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer one prompt, streaming the reasoning and the answer")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="send the prompt as-is, without the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    _model_args(g)
    _sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="an interactive multi-turn chat")
    _model_args(c)
    _sampling_args(c)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="architecture, shapes, parameter count, sizes and special tokens")
    i.add_argument("model", nargs="?", default=hub.DEFAULT_MODEL)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    s = sub.add_parser("serve", help="an OpenAI-compatible server with a chat page")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    s.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $R1_API_KEY, else no key)"
    )
    s.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback --host without an API key (only on a network that is yours alone)",
    )
    s.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name to answer besides localhost and IP addresses (repeatable); a page "
        "under any other name gets a 403, against DNS rebinding",
    )
    s.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin (https://app.example) whose pages may call the API (repeatable)",
    )
    s.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    s.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together")
    s.add_argument(
        "--max-requests",
        type=int,
        default=256,
        help="unfinished requests (running and queued) before new ones get a 503",
    )
    s.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool size (default: from memory)")
    s.set_defaults(func=cmd_serve)

    from r1.eval.data import TASKS

    default_samples = ", ".join(f"{t.samples} for {t.name}" for t in TASKS.values())
    e = sub.add_parser(
        "eval",
        help="score the model on a math set (pass@1, cons@K, pass@k), resumable",
        description="Defaults are the published settings: temperature 0.6, top-p 0.95, "
        "32,768 new tokens, the problem then 'Please reason step by step, and put your "
        "final answer within \\boxed{}.' with no system prompt, and K samples per "
        f"problem: {default_samples}. 'r1 eval report DIR [DIR2]' prints runs again.",
    )
    e.add_argument("--task", choices=list(TASKS), default=None)
    _model_args(e)
    e.add_argument("--samples", type=int, default=None, help=f"samples per problem, K (default: {default_samples})")
    e.add_argument("--max-tokens", type=int, default=32768, help="new tokens per sample (default 32768)")
    e.add_argument("--temperature", type=float, default=0.6)
    e.add_argument("--top-p", type=float, default=0.95)
    e.add_argument("--seed", type=int, default=0, help="sample j of problem i uses seed + i * K + j (default 0)")
    e.add_argument("--limit", type=int, default=None, help="only the first N problems")
    e.add_argument(
        "--data",
        default=None,
        help="a JSON Lines file of {id, problem, answer} (default: the r1 cache, else a download from Hugging Face)",
    )
    e.add_argument("--out", default=None, help="run directory (default: r1-eval/TASK-MODEL)")
    e.add_argument("--resume", action="store_true", help="continue the run in --out, keeping its finished samples")
    e.add_argument("--max-num-seqs", type=int, default=256, help="samples decoded together")
    e.add_argument("--kv-cache-tokens", type=int, default=None, help="KV pool size (default: from memory)")
    e.set_defaults(func=cmd_eval)
    eval_sub = e.add_subparsers(dest="eval_command")
    er = eval_sub.add_parser("report", help="print a run's summary again, or compare runs side by side")
    er.add_argument("dirs", nargs="+", metavar="DIR")
    er.set_defaults(func=cmd_eval_report)

    m = sub.add_parser("memory", help="memory needed at a quantization, context and batch (no weights loaded)")
    m.add_argument("--model", default=hub.DEFAULT_MODEL, help="HF folder, hub id, .gguf file, or demo / demo-small")
    m.add_argument(
        "--quant",
        type=lambda s: s.split(","),
        default=None,
        help="fp32, bf16, fp16, int8, int4, int4-pure, q8_0, q6_k, q5_k_m, q4_k_m, q4_0 (comma-separated for "
        "several; default: the device's dtype, or a set for the sweep)",
    )
    m.add_argument("--context", type=int, default=None, help="tokens per sequence (default: a sweep from 1K to 128K)")
    m.add_argument("--batch", type=int, default=1, help="sequences held at once")
    m.add_argument("--kv-dtype", default="auto", help="auto (the compute dtype), fp32, bf16, fp16, fp8, int8")
    m.add_argument("--device", default="cuda", choices=options.DEVICES)
    m.add_argument("--fit", default=None, metavar="SIZE", help="the largest context that fits SIZE (e.g. 8GiB)")
    m.add_argument("--plot", default=None, metavar="PNG", help="plot the sweep (needs matplotlib)")
    m.add_argument(
        "--per-tensor",
        action="store_true",
        help="each linear's format and bytes under r1's quants: the type its file stores it in and how r1 holds it",
    )
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_memory)

    b = sub.add_parser(
        "bench",
        help="measure latency (prefill, batch-1 decode) or batched throughput",
        description="Prompts are random token ids (reproducible by --seed); eos is ignored. "
        "See bench/README.md for what each number means.",
    )
    bench_sub = b.add_subparsers(dest="bench", required=True)
    bl = bench_sub.add_parser("latency", help="prefill tok/s of one prompt, then batch-1 decode tok/s")
    bl.add_argument(
        "--prompt-len", type=int, default=512, help="prompt tokens, prefilled in the engine's chunks (default 512)"
    )
    bl.add_argument("--output-len", type=int, default=128, help="tokens generated for decode (default 128)")
    bl.add_argument("--repeats", type=int, default=1, help="runs of each after the warm-up; the median is kept")
    bt = bench_sub.add_parser(
        "throughput",
        help="nano-vllm's bench: N random sequences in one batch, output tok/s",
        description="Defaults fit a 2-core CPU. nano-vllm's original GPU sizes: --num-seqs 256 "
        "--min-input 100 --max-input 1024 --min-output 100 --max-output 1024.",
    )
    bt.add_argument("--num-seqs", type=int, default=16)
    bt.add_argument("--min-input", type=int, default=32)
    bt.add_argument("--max-input", type=int, default=256)
    bt.add_argument("--min-output", type=int, default=32)
    bt.add_argument("--max-output", type=int, default=128)
    bt.add_argument("--temperature", type=float, default=0.6, help="nano-vllm samples at 0.6; 0 is greedy")
    bh = bench_sub.add_parser(
        "host",
        help="the engine's host work per decode step, around a model that costs nothing",
        description="The real engine (scheduler, block manager, runner inputs, sampler, detokenizer, "
        "outputs) around a stand-in model returning preset logits over the first 512 token ids; "
        "then the sampler alone over the real vocabulary. See bench/README.md.",
    )
    bh.add_argument("--model", default="demo", help="whose tokenizer the requests use (no weights are loaded)")
    bh.add_argument(
        "--sizes", type=_positive_ints, default="1,16,64,256", help="sequences decoding at once (comma-separated)"
    )
    bh.add_argument("--output-len", type=int, default=64, help="tokens each sequence generates (at least 8)")
    bh.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    bh.add_argument("--save", default=None, metavar="PATH", help="also write the result as JSON")
    bh.set_defaults(func=cmd_bench_host)
    for p in (bl, bt):
        _model_args(p)  # --model, --dtype, --threads, --quant, ...
        p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and lengths")
        p.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
        p.add_argument(
            "--save",
            default=None,
            metavar="PATH",
            help="also write the result, the machine and the command as JSON (e.g. bench/results/NAME.json)",
        )
        p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        err.print("\n[dim]interrupted[/dim]")
        return 130
    except (FileNotFoundError, ConnectionError, ValueError, TypeError, RuntimeError) as e:
        err.print(f"[bold red]error:[/bold red] {escape(str(e))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
