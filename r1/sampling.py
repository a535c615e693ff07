"""Logits to next tokens for a batch whose rows each have their own SamplingParams.

Owns the logit processors (penalties, temperature, top-k, top-p, min-p), the draw (greedy at
temperature 0, otherwise seeded per row), per-row generators and OpenAI-style logprobs. Each
processor is a pure function on float32 logits of shape (B, V) that returns new logits, masks
with -inf and leaves rows where it is disabled untouched. It does not own which rows are in the
batch, stopping, or filling model defaults into the params (SamplingParams.with_defaults).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from r1.sampling_params import SamplingParams

PerRow = float | Sequence[float] | torch.Tensor  # one value for every row, or one per row

# Sorting a 152k vocabulary takes ~50 ms a row on CPU, and the top_p nucleus nearly always lies
# in the top few hundred tokens: look there first and sort in full only rows that need it.
NUCLEUS_CANDIDATES = 1024


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams],
                prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Next token ids (B,) from the model's last-position logits (B, V); params must be concrete."""
    if any(p.temperature is None or p.top_p is None or p.top_k is None for p in params):
        raise ValueError("sample_next needs concrete params: call SamplingParams.with_defaults first")
    logits = apply_penalties(logits.float(), prompt_ids, output_ids, params)
    # Greedy rows skip the filters: they keep the top token, so cannot change the argmax.
    sampled = [not p.greedy for p in params]
    logits = apply_temperature(logits, [p.temperature for p in params])
    logits = apply_top_k(logits, [p.top_k if s else 0 for p, s in zip(params, sampled)])
    logits = apply_top_p(logits, [p.top_p if s else 1.0 for p, s in zip(params, sampled)])
    logits = apply_min_p(logits, [p.min_p if s else 0.0 for p, s in zip(params, sampled)])
    return sample(logits, params, generators)


def apply_penalties(logits: torch.Tensor, prompt_ids: Sequence[Sequence[int]],
                    output_ids: Sequence[Sequence[int]],
                    params: Sequence[SamplingParams]) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens (positive logits divided by it, negative
    multiplied), then frequency (per occurrence) and presence (once) penalties subtracted for
    tokens in the output only."""
    rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    occ = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
    if not rep and not occ:
        return logits
    logits = logits.clone()
    if rep:
        pos, toks, _ = _token_counts([[*prompt_ids[i], *output_ids[i]] for i in rep], logits)
        rows = _values(rep, logits, torch.int64)[pos]
        penalty = _values([params[i].repetition_penalty for i in rep], logits)[pos]
        seen = logits[rows, toks]
        logits[rows, toks] = torch.where(seen > 0, seen / penalty, seen * penalty)
    if occ:
        pos, toks, counts = _token_counts([output_ids[i] for i in occ], logits)
        rows = _values(occ, logits, torch.int64)[pos]
        frequency = _values([params[i].frequency_penalty for i in occ], logits)[pos]
        presence = _values([params[i].presence_penalty for i in occ], logits)[pos]
        logits[rows, toks] -= frequency * counts + presence
    return logits


def apply_temperature(logits: torch.Tensor, temperature: PerRow) -> torch.Tensor:
    """Divide each row by its temperature; rows at 0 (greedy) or 1 are left as they are."""
    t = _per_row(temperature, logits, torch.float32)
    if bool(((t == 0) | (t == 1)).all()):
        return logits
    t = torch.where(t == 0, torch.ones_like(t), t)
    return logits / t.to(logits.device).unsqueeze(1)


def apply_top_k(logits: torch.Tensor, top_k: PerRow) -> torch.Tensor:
    """Keep each row's k highest logits (ties with the k-th are kept too); k <= 0 or >= V
    disables the row."""
    k = _per_row(top_k, logits, torch.int64)
    enabled = (k > 0) & (k < logits.shape[1])

    def keep_top_k(rows: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        top = rows.topk(int(k.max()), dim=1).values  # (R, k_max), descending
        kth = top.gather(1, (k.to(rows.device) - 1).unsqueeze(1))  # (R, 1)
        return rows.masked_fill(rows < kth, float("-inf"))

    return _on_rows(logits, enabled, keep_top_k, k)


def apply_top_p(logits: torch.Tensor, top_p: PerRow) -> torch.Tensor:
    """Keep the smallest set of highest-probability tokens whose total probability reaches
    top_p (always at least the top token); top_p >= 1 disables the row."""
    p = _per_row(top_p, logits, torch.float32)

    def keep_nucleus(rows: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        p = p.to(rows.device)
        out, reached = _nucleus(rows, p, min(NUCLEUS_CANDIDATES, rows.shape[1]))
        if not bool(reached.all()):
            short = ~reached
            out[short] = _nucleus(rows[short], p[short], rows.shape[1])[0]
        return out

    return _on_rows(logits, p < 1, keep_nucleus, p)


def _nucleus(rows: torch.Tensor, p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows with only their top_p nucleus among their k likeliest tokens kept, and whether
    those k reach top_p (where they do not, the nucleus extends past them)."""
    probs, order = rows.softmax(dim=1).topk(k, dim=1)  # (R, k), descending
    cumulative = probs.cumsum(dim=1)
    # A token is needed while the tokens before it still fall short of top_p.
    needed = cumulative - probs < p.unsqueeze(1)
    kept = rows.gather(1, order).masked_fill(~needed, float("-inf"))
    out = torch.full_like(rows, float("-inf")).scatter_(1, order, kept)
    return out, cumulative[:, -1] >= p


def apply_min_p(logits: torch.Tensor, min_p: PerRow) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability;
    min_p 0 disables the row."""
    m = _per_row(min_p, logits, torch.float32)

    def keep_likely(rows: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        # p_i / p_max = exp(l_i - l_max), so the test needs no softmax.
        floor = rows.max(dim=1, keepdim=True).values + m.to(rows.device).log().unsqueeze(1)
        return rows.masked_fill(rows < floor, float("-inf"))

    return _on_rows(logits, m > 0, keep_likely, m)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Token ids (B,): the argmax for greedy rows, a draw from softmax(logits) for the others.

    Each sampled row inverts its cumulative distribution at one uniform number drawn from its
    own generator (rows without one share a single draw from the global RNG), so a seed gives
    the same tokens whichever rows share the batch. One number per row rather than V keeps
    the random number generation negligible next to the softmax.
    """
    tokens = logits.argmax(dim=1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    u = torch.empty(len(rows), device=logits.device)
    unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
    seeded = [j for j, i in enumerate(rows) if generators[i] is not None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), device=logits.device)
    if seeded:
        # Drawn where each generator lives: a CPU generator gives the same tokens on any device.
        draws = [torch.rand(1, generator=generators[rows[j]], device=generators[rows[j]].device)
                 for j in seeded]
        u[seeded] = torch.cat(draws).to(logits.device)
    cdf = logits[rows].softmax(dim=1).cumsum(dim=1)  # (R, V)
    # 1 - u lies in (0, 1], so the first token to reach it never has probability 0; scaling by
    # the last entry absorbs the rounding that leaves the total a little off 1.
    target = (1 - u).unsqueeze(1) * cdf[:, -1:]  # (R, 1)
    drawn = torch.searchsorted(cdf, target).squeeze(1)
    tokens[rows] = drawn.clamp_max(logits.shape[1] - 1)
    return tokens


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with `seed` on `device`, or None (the global RNG) when seed is None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                     top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen (B,), top ids (B, top_n), top logprobs (B, top_n)) from the model's raw logits.

    Raw, not processed: OpenAI reports the model's distribution, and top-k/top-p would put -inf
    on the alternatives the caller wants to see.
    """
    logprobs = logits.float().log_softmax(dim=1)  # (B, V)
    chosen = logprobs.gather(1, token_ids.to(logits.device).long().unsqueeze(1)).squeeze(1)
    top_logprobs, top_ids = logprobs.topk(top_n, dim=1)
    return chosen, top_ids, top_logprobs


def _on_rows(logits: torch.Tensor, enabled: torch.Tensor,
             fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             values: torch.Tensor) -> torch.Tensor:
    """fn(rows, their values) applied to the enabled rows only; the others pass through."""
    if not bool(enabled.any()):
        return logits
    if bool(enabled.all()):
        return fn(logits, values)
    index = enabled.nonzero().squeeze(1)
    out = logits.clone()
    out[index.to(logits.device)] = fn(logits[index.to(logits.device)], values[index])
    return out


def _per_row(value: PerRow, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`value` as a (B,) tensor; kept on the CPU when given as numbers, so that deciding which
    rows are enabled does not wait on the device."""
    t = torch.as_tensor(value, dtype=dtype)
    return t.expand(logits.shape[0]) if t.dim() == 0 else t


def _values(values: list, logits: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype or logits.dtype, device=logits.device)


def _token_counts(ids: list[list[int]],
                  logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(list index, token id, count) for each distinct token in each of the lists `ids`."""
    vocab, device = logits.shape[1], logits.device
    flat = torch.tensor([t for row in ids for t in row], dtype=torch.int64, device=device)
    owner = torch.repeat_interleave(torch.arange(len(ids), device=device),
                                    torch.tensor([len(row) for row in ids], device=device))
    # One key per (list, token) pair, so torch.unique counts them without a (B, V) table.
    keys, counts = torch.unique(owner * vocab + flat, return_counts=True)
    return keys // vocab, keys % vocab, counts.to(logits.dtype)
