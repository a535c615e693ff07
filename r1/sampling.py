"""Logits to next tokens for a batch whose rows each have their own SamplingParams.

Owns the logit processors (penalties, temperature, top-k, top-p, min-p), the draw (greedy at
temperature 0, otherwise seeded per row), per-row generators and OpenAI-style logprobs.
Penalties and temperature are pure functions on float32 logits of shape (B, V). The three
filters work on each row's likeliest tokens in descending order (`filter_candidates`), since
what they keep is always a run of the top of the distribution: sorting a 152k vocabulary costs
~6 ms a row on CPU, and a sampled token at R1's settings nearly always comes from the top few
dozen. On the CPU r1's `softmax_topk` kernel finds those tokens, and `greedy_tokens` stands in
for argmax: PyTorch's CPU topk and argmax are scalar loops, 12 and 2 ms of a 16-sequence step.
It does not own which rows are in the batch, stopping, or filling model defaults into the params
(SamplingParams.with_defaults).
"""

from __future__ import annotations

from typing import Sequence

import torch

from r1 import kernels
from r1.sampling_params import SamplingParams

PerRow = float | Sequence[float] | torch.Tensor  # one value for every row, or one per row

# The filters first look at each row's CANDIDATES likeliest tokens, and widen the look by
# CANDIDATES_GROWTH (then to the whole vocabulary) only for rows whose kept set may reach past it.
CANDIDATES = 64
CANDIDATES_GROWTH = 64


def sample_next(logits: torch.Tensor, params: Sequence[SamplingParams],
                prompt_ids: Sequence[Sequence[int]], output_ids: Sequence[Sequence[int]],
                generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Next token ids (B,) from the model's last-position logits (B, V); params must be concrete."""
    if any(p.temperature is None or p.top_p is None or p.top_k is None for p in params):
        raise ValueError("sample_next needs concrete params: call SamplingParams.with_defaults first")
    logits = apply_penalties(logits.float(), prompt_ids, output_ids, params)
    if all(p.greedy for p in params):  # no row index to copy over: nothing waits on the device
        return greedy_tokens(logits)
    tokens = torch.empty(len(params), dtype=torch.int64, device=logits.device)

    def rows(index: list[int]) -> torch.Tensor:  # whole batches, the usual case, are not copied
        return logits if len(index) == len(params) else logits[index]

    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        tokens[greedy] = greedy_tokens(rows(greedy))
    vocab = logits.shape[1]
    filtered = [i for i, p in enumerate(params) if not p.greedy and _filters(p, vocab)]
    if filtered:
        ps = [params[i] for i in filtered]
        kept, ids = filter_candidates(rows(filtered), [p.top_k for p in ps], [p.top_p for p in ps],
                                      [p.min_p for p in ps], temperature=[p.temperature for p in ps])
        chosen = draw(kept, [generators[i] for i in filtered])
        tokens[filtered] = ids.gather(1, chosen.unsqueeze(1)).squeeze(1)
    unfiltered = [i for i, p in enumerate(params) if not p.greedy and not _filters(p, vocab)]
    if unfiltered:
        scaled = apply_temperature(rows(unfiltered), [params[i].temperature for i in unfiltered])
        tokens[unfiltered] = draw(scaled.softmax(dim=1), [generators[i] for i in unfiltered])
    return tokens


def greedy_tokens(logits: torch.Tensor, chunks: int = 64) -> torch.Tensor:
    """Each row's argmax (B,), the first on ties, as torch.argmax gives it.

    torch.amax is vectorized where argmax is not, so: each chunk's maximum, the first chunk
    holding the row's maximum (argmax over `chunks` values), then the argmax within that chunk.
    """
    rows, vocab = logits.shape
    if vocab % chunks:
        return logits.argmax(dim=1)
    by_chunk = logits.view(rows, chunks, vocab // chunks)
    chunk = by_chunk.amax(dim=2).argmax(dim=1)
    within = by_chunk[torch.arange(rows, device=logits.device), chunk].argmax(dim=1)
    return chunk * (vocab // chunks) + within


def _filters(p: SamplingParams, vocab: int) -> bool:
    """Whether any of top-k, top-p, min-p can drop a token (a top_k of V or more keeps all)."""
    return 0 < p.top_k < vocab or p.top_p < 1 or p.min_p > 0


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


def filter_candidates(logits: torch.Tensor, top_k: PerRow, top_p: PerRow, min_p: PerRow,
                      temperature: PerRow = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's tokens that survive top-k, then top-p over what top-k kept, then min-p, under
    softmax(logits / temperature) (temperatures positive).

    Returns (R, W) probabilities in descending order, 0 past each row's kept tokens, and their
    token ids. Per row: top_k keeps the k likeliest tokens and any tied with the k-th (0 or >= V
    disables it); top_p keeps the smallest run of likeliest tokens whose probability reaches
    top_p, always the top one (1 disables it); min_p drops tokens below min_p times the top
    token's probability (0 disables it). Every row must enable at least one of them: a row
    without any keeps all V tokens.
    """
    vocab = logits.shape[1]
    k, p, m = (_per_row(v, logits, dtype).to(logits.device)
               for v, dtype in ((top_k, torch.int64), (top_p, torch.float32), (min_p, torch.float32)))
    k = torch.where(k < vocab, k, torch.zeros_like(k))
    t = _per_row(temperature, logits, torch.float32).to(logits.device)
    # One past the largest k, so that the candidates show whether the k-th token's ties go on.
    width = min(vocab, max(CANDIDATES, int(k.max()) + 1))
    pending = torch.arange(logits.shape[0], device=logits.device)
    found = []  # (rows, kept probabilities, ids) of the rows settled at each width
    while len(pending):
        first = len(found) == 0  # every row: no copy
        values, ids = _softmax_topk(logits if first else logits[pending], t if first else t[pending], width)
        kept, settled = _filter_sorted(values, k[pending], p[pending], m[pending])
        settled |= width == vocab
        found.append((pending[settled], kept[settled], ids[settled]))
        pending = pending[~settled]
        width = min(vocab, width * CANDIDATES_GROWTH)
    widest = found[-1][1].shape[1]
    out = torch.zeros((logits.shape[0], widest), device=logits.device)
    out_ids = torch.zeros((logits.shape[0], widest), dtype=torch.int64, device=logits.device)
    for rows, kept, ids in found:
        out[rows, :kept.shape[1]], out_ids[rows, :ids.shape[1]] = kept, ids
    return out, out_ids


def _softmax_topk(logits: torch.Tensor, temperature: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(logits / temperature).topk(width): each row's `width` likeliest tokens, descending."""
    op = kernels.op_for("softmax_topk", logits)
    if op is not None:
        return op(logits.contiguous(), temperature.contiguous(), width)
    return apply_temperature(logits, temperature).softmax(dim=1).topk(width, dim=1)


def _filter_sorted(values: torch.Tensor, k: torch.Tensor, p: torch.Tensor,
                   m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The three filters on each row's W likeliest tokens' probabilities `values` (descending),
    and whether the row's kept tokens certainly all lie among them."""
    has_k, has_p, has_m = (k > 0).unsqueeze(1), (p < 1).unsqueeze(1), (m > 0).unsqueeze(1)
    keep = values > 0
    # top-k: settled when the k-th token lies among the candidates and its ties end there too
    # (or it has probability 0, which no draw takes).
    kth = values.gather(1, (k.clamp(1, values.shape[1]) - 1).unsqueeze(1))
    keep &= ~has_k | (values >= kth)
    k_settled = (values[:, -1:] < kth) | (kth == 0)
    # top-p: probabilities over what top-k kept (all among the candidates once top-k is
    # settled); without top-k the softmax already sums to 1 over the vocabulary.
    kept = values.masked_fill(~keep, 0)
    kept = torch.where(has_k, kept / kept.sum(dim=1, keepdim=True), kept)
    cumulative = kept.cumsum(dim=1)
    # A token is needed while the tokens before it still fall short of top_p.
    keep &= ~has_p | (cumulative - kept < p.unsqueeze(1))
    p_settled = cumulative[:, -1:] >= p.unsqueeze(1)
    # min-p against the top token's probability.
    floor = m.unsqueeze(1) * values[:, :1]
    keep &= ~has_m | (values >= floor)
    m_settled = values[:, -1:] < floor
    # The kept run is the shortest of the three filters' runs, so one settled filter settles the
    # row; with top-k on, top-p's probabilities are right only once top-k is settled.
    settled = torch.where(has_k, k_settled, (has_p & p_settled) | (has_m & m_settled))
    return values.masked_fill(~keep, 0), settled.squeeze(1)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Column indices (R,): one draw per row in proportion to `probs` (R, W), which need not
    sum to 1.

    Each row inverts its cumulative distribution at one uniform number drawn from its own
    generator (rows without one share a single draw from the global RNG), so a seed gives the
    same tokens whichever rows share the batch. One number per row rather than W keeps the
    random number generation negligible.
    """
    u = torch.empty(probs.shape[0], device=probs.device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), device=probs.device)
    if seeded:
        # Drawn where each generator lives: a CPU generator gives the same tokens on any device.
        draws = [torch.rand(1, generator=generators[i], device=generators[i].device) for i in seeded]
        u[seeded] = torch.cat(draws).to(probs.device)
    cdf = probs.cumsum(dim=1)
    # 1 - u lies in (0, 1], so the first column to reach it never has probability 0; scaling by
    # the last entry absorbs the rounding that leaves the total a little off 1.
    target = (1 - u).unsqueeze(1) * cdf[:, -1:]  # (R, 1)
    return torch.searchsorted(cdf, target).squeeze(1).clamp_max(probs.shape[1] - 1)


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
