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

from r1.loaders import hub

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=hub.DEFAULT_MODEL,
                   help="HF folder, hub id, .gguf file, or demo / demo-small (offline stand-ins)")
    p.add_argument("--tokenizer", default=None,
                   help="use this tokenizer and chat template instead of the model's (HF folder, hub id, .gguf)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--max-model-len", type=int, default=None)


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
    return SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                          repetition_penalty=a.repetition_penalty, max_tokens=a.max_tokens, seed=a.seed,
                          stop=a.stop)


def _load(a: argparse.Namespace, progress: bool = True):
    from r1.llm import LLM
    if not a.json:
        err.print(f"[dim]loading {escape(a.model)} ...[/dim]")
    llm = LLM(a.model, tokenizer=a.tokenizer, dtype=a.dtype, device=a.device, threads=a.threads,
              max_model_len=a.max_model_len, progress=progress)
    if not a.json:
        err.print(f"[dim]loaded in {llm.load_seconds:.1f}s: {llm.device.type}, {str(llm.dtype).removeprefix('torch.')}, "
                  f"context {llm.engine.max_model_len} tokens[/dim]")
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
    return (f"prompt {o.num_prompt_tokens} tokens ({prefill:.1f} tok/s), generated {o.num_output_tokens} tokens "
            f"({decode:.1f} tok/s), finish: {o.finish_reason}")


def cmd_generate(a: argparse.Namespace) -> None:
    llm = _load(a, progress=not a.json)
    params = _params(a)
    prompt = a.prompt if a.raw else [{"role": "user", "content": a.prompt}]
    if a.json:
        c = (llm.generate(prompt, params) if a.raw else llm.chat(prompt, params))[0]
        print(json.dumps({"text": c.text, "reasoning": c.reasoning, "answer": c.answer,
                          "prompt_token_ids": c.prompt_token_ids, "token_ids": c.token_ids,
                          "finish_reason": c.finish_reason,
                          "usage": {"prompt_tokens": c.usage["prompt_tokens"],
                                    "completion_tokens": c.usage["completion_tokens"]},
                          "timing": c.timing}, ensure_ascii=False))
        return
    last, _ = _stream_answer(llm, prompt, params, chat=not a.raw)
    err.print(f"[dim]{_stats(last)}[/dim]")


def cmd_chat(a: argparse.Namespace) -> None:
    a.json = False
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
