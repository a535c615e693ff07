"""Logits to next tokens for a batch whose rows each have their own SamplingParams.

Owns the logit processors (penalties, temperature, top-k, top-p, min-p), the draw (greedy at
temperature 0, otherwise from uniform numbers drawn per row), per-row generators and
OpenAI-style logprobs. Penalties and temperature are pure functions on float32 logits (B, V).

The three filters keep a run of the top of the distribution, and at R1's settings that run is
nearly always a few dozen tokens, so a row is first filtered among its CANDIDATES likeliest
tokens (`softmax_topk`: on the CPU r1's kernel, since PyTorch's topk is a scalar loop). A row
whose kept run may reach past them (a flat distribution under top-p or min-p alone) is sampled
over the whole vocabulary by rejection rather than by sorting its 152k probabilities (~6 ms a
row on the CPU, a full topk on the GPU): a token drawn from the softmax, min-p's cut applied, is
accepted if top-p keeps it, which one sum over the row tells (the mass of the likelier tokens).
Every step draws TRIES + 1 uniform numbers per row, so a seed gives the same tokens whichever
rows share the batch; a row rejected TRIES times (a chance of at most (1 - top_p) ** TRIES) is
filtered exactly by sorting. `draw_tokens` does a step's draw without waiting on the device: the
rows whose kept run may reach past the candidates come back marked unsettled, and `settle_rows`
draws them once the caller has read which they are (the engine reads that with the tokens, so a
GPU step has no wait but that read; penalties add torch.unique's). `greedy_tokens` stands in for argmax, a
scalar loop on the CPU too. It does not own which rows are in the batch, stopping, or filling model
defaults into the params (SamplingParams.with_defaults).
"""

from __future__ import annotations

from typing import Sequence

import torch

from r1 import kernels
from r1.sampling_params import SamplingParams

PerRow = float | Sequence[float] | torch.Tensor  # one value for every row, or one per row

CANDIDATES = 64  # each row's likeliest tokens that the filters look at first
TRIES = 3  # draws a wide row may have rejected before it is filtered by sorting


def sample_next(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    generators: Sequence[RowGenerator | None],
) -> torch.Tensor:
    """Next token ids (B,) from the model's last-position logits (B, V); params must be concrete."""
    return sample_drawn(logits, params, prompt_ids, output_ids, step_uniforms(params, generators))


def step_uniforms(params: Sequence[SamplingParams], generators: Sequence[RowGenerator | None]) -> torch.Tensor | None:
    """The uniform numbers (B, TRIES + 1) a step's rows draw, or None when every row is greedy."""
    return None if all(p.greedy for p in params) else uniforms(generators, TRIES + 1)


def sample_drawn(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    u: torch.Tensor | None,
) -> torch.Tensor:
    """sample_next with the rows' uniform numbers drawn already (step_uniforms), so that a row
    sampled again draws what it drew the first time."""
    tokens, unsettled = draw_tokens(logits, params, prompt_ids, output_ids, u)
    if unsettled is not None:
        settle_now(tokens, unsettled, logits, params, prompt_ids, output_ids, u)
    return tokens


def settle_now(
    tokens: torch.Tensor,
    unsettled: torch.Tensor,
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    u: torch.Tensor,
) -> None:
    """Draw draw_tokens' unsettled rows into tokens, in place, waiting on the device to learn
    which they are."""
    rows = unsettled.nonzero().squeeze(1).tolist()
    if rows:
        tokens[_on(rows, torch.int64, tokens.device)] = settle_rows(logits, params, prompt_ids, output_ids, u, rows)


def draw_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    u: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step's draw without waiting on the device: (tokens (B,), unsettled (B,) bool or None).

    A row whose kept tokens may reach past its candidates is unsettled: its token is the
    candidates' draw, a stand-in, until `settle_rows` draws it over the whole vocabulary once the
    caller has read which rows those are (with the tokens, in one copy). None: no row can be."""
    if any(p.temperature is None or p.top_p is None or p.top_k is None for p in params):
        raise ValueError("sample_next needs concrete params: call SamplingParams.with_defaults first")
    logits = apply_penalties(logits.float(), prompt_ids, output_ids, params)
    if all(p.greedy for p in params):  # no row index to copy over: nothing waits on the device
        return greedy_tokens(logits), None
    device, vocab = logits.device, logits.shape[1]

    def rows(index: list[int]) -> torch.Tensor:  # whole batches, the usual case, are not copied
        return logits if len(index) == len(params) else logits[_on(index, torch.int64, device)]

    greedy = [i for i, p in enumerate(params) if p.greedy]
    filtered = [i for i, p in enumerate(params) if not p.greedy and _filters(p, vocab)]
    # A top_k past the candidates widens the candidates of every row filtered with it: apart.
    filtered_groups = [
        g
        for g in (
            [i for i in filtered if params[i].top_k < CANDIDATES],
            [i for i in filtered if params[i].top_k >= CANDIDATES],
        )
        if g
    ]
    unfiltered = [i for i, p in enumerate(params) if not p.greedy and not _filters(p, vocab)]
    # Drawn on the host, then copied once.
    u = u.to(device, non_blocking=True)

    def drawn(index: list[int]) -> torch.Tensor:
        return u if len(index) == len(params) else u[_on(index, torch.int64, device)]

    parts = []  # (rows, their tokens, which of them are unsettled or None)
    if greedy:
        parts.append((greedy, greedy_tokens(rows(greedy)), None))
    for group in filtered_groups:
        parts.append((group, *_sample_filtered(rows(group), [params[i] for i in group], drawn(group))))
    if unfiltered:
        scaled = apply_temperature(rows(unfiltered), [params[i].temperature for i in unfiltered])
        parts.append((unfiltered, draw(scaled.softmax(dim=1), drawn(unfiltered)[:, 0]), None))
    if len(parts) == 1:
        return parts[0][1:]
    tokens = torch.empty(len(params), dtype=torch.int64, device=device)
    unsettled = None
    for index, part, part_unsettled in parts:
        index = _on(index, torch.int64, device)
        tokens[index] = part
        if part_unsettled is not None:
            if unsettled is None:
                unsettled = torch.zeros(len(params), dtype=torch.bool, device=device)
            unsettled[index] = part_unsettled
    return tokens, unsettled


def settle_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    u: torch.Tensor,
    rows: list[int],
) -> torch.Tensor:
    """The tokens of draw_tokens' unsettled `rows` (by index), drawn over the whole vocabulary
    from the same logits, settings and uniform numbers: what sampling them at once gives."""
    pick = _on(rows, torch.int64, logits.device)
    sub = apply_penalties(
        logits[pick].float(),
        [prompt_ids[i] for i in rows],
        [output_ids[i] for i in rows],
        [params[i] for i in rows],
    )
    chosen = [params[i] for i in rows]
    (k, p, m, t), _ = _filter_settings(
        sub,
        [x.top_k for x in chosen],
        [x.top_p for x in chosen],
        [x.min_p for x in chosen],
        [x.temperature for x in chosen],
    )
    return _sample_wide(sub, k, p, m, t, u[rows].to(logits.device), min_p=any(x.min_p > 0 for x in chosen))


def verify_proposed(
    logits: torch.Tensor, params: SamplingParams, proposed: list[int], generator: RowGenerator | None
) -> tuple[list[bool], list[int], int]:
    """The verification of n proposed tokens (speculative decoding) from the target's logits at
    their n + 1 positions (n + 1, V): (whether row i keeps proposed[i], the token row i takes
    when it does not, the token after the last row); params concrete, without penalties.

    Proposals are point masses, so Leviathan et al.'s test keeps proposed[i] with probability
    p_i(proposed[i]) and otherwise draws from p_i with it removed; the caller walks the rows in
    order and stops at the first rejection. Every kept and drawn token thus follows the same
    distribution as plain sampling (greedy: the argmax, kept when it is the proposal)."""
    rows = len(proposed) + 1
    if params.greedy:
        best = greedy_tokens(logits.float()).tolist()
        return [best[i] == proposed[i] for i in range(rows - 1)], best[:-1], best[-1]
    vocab = logits.shape[1]
    if _filters(params, vocab):
        probs, ids = filter_candidates(logits.float(), params.top_k, params.top_p, params.min_p, params.temperature)
    else:
        probs = apply_temperature(logits.float(), params.temperature).softmax(dim=1)
        ids = torch.arange(vocab, device=logits.device).expand(rows, vocab)
    u = uniforms([generator], 2 * rows).view(2, rows).to(logits.device)
    probs = probs / probs.sum(dim=1, keepdim=True)
    guess = torch.tensor(proposed + [-1], device=logits.device).unsqueeze(1)
    is_guess = ids == guess  # (rows, W): the proposal's column, if it was kept at all
    p_guess = (probs * is_guess).sum(dim=1)
    keeps = (u[0] < p_guess)[:-1].tolist()
    residual = ids.gather(1, draw(probs.masked_fill(is_guess, 0), u[1]).unsqueeze(1)).squeeze(1).tolist()
    return keeps, residual[:-1], residual[-1]


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


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
) -> torch.Tensor:
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
    return logits / t.to(logits.device, non_blocking=True).unsqueeze(1)


def filter_candidates(
    logits: torch.Tensor, top_k: PerRow, top_p: PerRow, min_p: PerRow, temperature: PerRow = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's tokens that survive top-k, then top-p over what top-k kept, then min-p, under
    softmax(logits / temperature) (temperatures positive).

    Returns (R, W) probabilities in descending order, 0 past each row's kept tokens, and their
    token ids: W is the candidates' width, or V when some row's kept tokens reach past them. Per
    row: top_k keeps the k likeliest tokens and any tied with the k-th (0 or >= V disables it);
    top_p keeps the smallest run of likeliest tokens whose probability reaches top_p, always the
    top one (1 disables it); min_p drops tokens below min_p times the top token's probability
    (0 disables it). Every row must enable at least one of them: a row without any keeps all V
    tokens.
    """
    vocab = logits.shape[1]
    (k, p, m, t), width = _filter_settings(logits, top_k, top_p, min_p, temperature)
    values, ids = _softmax_topk(logits, t, width)
    kept, settled = _filter_sorted(values, k, p, m)
    if width == vocab:
        return kept, ids
    wide = (~settled).nonzero().squeeze(1)
    if not len(wide):
        return kept, ids
    kept, ids = (torch.nn.functional.pad(x, (0, vocab - width)) for x in (kept, ids))
    values, wide_ids = _softmax_topk(logits[wide], t[wide], vocab)
    kept[wide], ids[wide] = _filter_sorted(values, k[wide], p[wide], m[wide])[0], wide_ids
    return kept, ids


def _filter_settings(
    logits: torch.Tensor, top_k: PerRow, top_p: PerRow, min_p: PerRow, temperature: PerRow
) -> tuple[tuple[torch.Tensor, ...], int]:
    """((k, p, m, t) as (R,) tensors on the logits' device, a k of V or more as 0), and the
    candidates' width: one past the largest k, so that the candidates show whether the k-th
    token's ties go on. Decided on the host when the values are numbers."""
    vocab = logits.shape[1]
    k = _per_row(top_k, logits, torch.int64)
    k = torch.where(k < vocab, k, torch.zeros_like(k))
    width = min(vocab, max(CANDIDATES, int(k.max()) + 1))
    settings = (
        k,
        _per_row(top_p, logits, torch.float32),
        _per_row(min_p, logits, torch.float32),
        _per_row(temperature, logits, torch.float32),
    )
    return tuple(x.to(logits.device, non_blocking=True) for x in settings), width


def _sample_filtered(
    logits: torch.Tensor, params: Sequence[SamplingParams], u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens (R,), unsettled (R,) bool or None) for rows that each enable a filter, from their
    uniform numbers u (R, TRIES + 1): the candidates' draw, settled where the row's kept tokens
    all lie among them; the others are settle_rows'. None: the candidates are the vocabulary."""
    vocab = logits.shape[1]
    (k, p, m, t), width = _filter_settings(
        logits,
        [x.top_k for x in params],
        [x.top_p for x in params],
        [x.min_p for x in params],
        [x.temperature for x in params],
    )
    values, ids = _softmax_topk(logits, t, width)
    fused = kernels.op_for("filter_draw", values)
    if fused is not None and not bool(k.any()):  # one call on the CPU; the kernel has no top-k
        tokens, settled = fused(values, ids, p.contiguous(), m.contiguous(), u[:, 0].contiguous())
    else:
        kept, settled = _filter_sorted(values, k, p, m)
        tokens = ids.gather(1, draw(kept, u[:, 0]).unsqueeze(1)).squeeze(1)
    return tokens, None if width == vocab else ~settled


def _sample_wide(
    logits: torch.Tensor,
    k: torch.Tensor,
    p: torch.Tensor,
    m: torch.Tensor,
    t: torch.Tensor,
    u: torch.Tensor,
    min_p: bool,
) -> torch.Tensor:
    """Tokens (R,) over the whole vocabulary for rows whose kept tokens may reach past the
    candidates, with filter_candidates' semantics, except that tokens tied at top-p's edge are all
    kept (where a sort keeps those it reaches first; equal float probabilities are rare there).
    `min_p`: whether any row has min-p on.

    min-p keeps the tokens at or above a level, which masks the softmax exactly; top-p keeps a
    token when the tokens likelier than it hold less than top_p, so a draw from the masked softmax
    is kept or rejected from one sum over the row, and is kept with probability at least top_p.
    Rows rejected TRIES times are filtered by sorting (filter_candidates), each with the uniform
    number the candidates' draw left unused; so are rows with top-k on, wide only when ties at
    the k-th token run past the candidates.
    """
    probs = (logits / t.unsqueeze(1)).softmax(dim=1)
    allowed = torch.where(probs >= (m * probs.amax(dim=1)).unsqueeze(1), probs, 0) if min_p else probs
    cdf = allowed.cumsum(dim=1)
    tokens = torch.zeros(len(logits), dtype=torch.int64, device=logits.device)
    pending = torch.arange(len(logits), device=logits.device)
    for attempt in range(1, TRIES + 1):
        rows = slice(None) if attempt == 1 else pending  # the first try takes every row: no copies
        drawn, row_probs = _invert(cdf[rows], u[rows, attempt]), probs[rows]
        likelier = _mass_above(row_probs, row_probs.gather(1, drawn.unsqueeze(1)))
        kept = (k[rows] == 0) & ((p[rows] >= 1) | (likelier < p[rows]))
        tokens[pending[kept]] = drawn[kept]
        pending = pending[~kept]
        if not len(pending):
            return tokens
    probs, ids = filter_candidates(logits[pending], k[pending], p[pending], m[pending], t[pending])
    tokens[pending] = ids.gather(1, draw(probs, u[pending, 0]).unsqueeze(1)).squeeze(1)
    return tokens


def _mass_above(probs: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Each row's sum of the probabilities above its level (R, 1), strictly: the sum of
    relu(probs - level), plus level once for each token above it. Arithmetic in place, where a
    mask and where() cost ~5x as much on the CPU."""
    excess = (probs - level).relu_()
    return excess.sum(dim=1) + level.squeeze(1) * excess.sign_().sum(dim=1)


def _softmax_topk(logits: torch.Tensor, temperature: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(logits / temperature).topk(width): each row's `width` likeliest tokens, descending."""
    op = kernels.op_for("softmax_topk", logits)
    if op is not None:
        return op(logits.contiguous(), temperature.contiguous(), width)
    return (logits / temperature.unsqueeze(1)).softmax(dim=1).topk(width, dim=1)


def _filter_sorted(
    values: torch.Tensor, k: torch.Tensor, p: torch.Tensor, m: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
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


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Column indices (R,): one draw per row in proportion to `probs` (R, W), which need not
    sum to 1, from each row's uniform number u (R,) in [0, 1)."""
    return _invert(probs.cumsum(dim=1), u)


def _invert(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Each row's first column whose cumulative probability cdf (R, W) reaches 1 - u of the row's
    total. 1 - u lies in (0, 1], so that column never has probability 0; scaling by the last entry
    absorbs the rounding that leaves the total a little off 1."""
    target = (1 - u).unsqueeze(1) * cdf[:, -1:]  # (R, 1)
    return torch.searchsorted(cdf, target).squeeze(1).clamp_max(cdf.shape[1] - 1)


class RowGenerator:
    """A request's own uniform numbers: a seeded generator on the CPU, drawn BLOCK numbers at a
    time and handed out n at a time, the same numbers in the same order as n at a time from the
    generator, at a fraction of the calls."""

    BLOCK = 256

    def __init__(self, seed: int):
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.drawn: list[float] = []
        self.used = 0

    def take(self, n: int) -> list[float]:
        if self.used + n > len(self.drawn):
            more = torch.rand(max(n, self.BLOCK), generator=self.generator).tolist()
            self.drawn, self.used = self.drawn[self.used :] + more, 0
        self.used += n
        return self.drawn[self.used - n : self.used]


def uniforms(generators: Sequence[RowGenerator | None], n: int) -> torch.Tensor:
    """(R, n) float32 uniform numbers in [0, 1) on the host, each row's from its generator (rows
    without one from the global RNG). A fixed n a step, whatever a row does with them, and
    generators on the CPU, so a seed gives the same tokens whichever rows share the batch, on any
    device; a few numbers a row rather than one per vocabulary entry keep the random number
    generation negligible."""
    unseeded = iter(torch.rand(sum(g is None for g in generators), n).tolist())
    return torch.tensor([next(unseeded) if g is None else g.take(n) for g in generators], dtype=torch.float32)


def make_generator(seed: int | None) -> RowGenerator | None:
    """A request's generator for `seed`, or None (the global RNG) when seed is None."""
    return None if seed is None else RowGenerator(seed)


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, top_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    return _on(values, dtype or logits.dtype, logits.device)


def _on(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host numbers as a tensor on `device`, copied without waiting for the device's queue."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _token_counts(ids: list[list[int]], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(list index, token id, count) for each distinct token in each of the lists `ids`."""
    vocab, device = logits.shape[1], logits.device
    flat = torch.tensor([t for row in ids for t in row], dtype=torch.int64, device=device)
    owner = torch.repeat_interleave(
        torch.arange(len(ids), device=device), torch.tensor([len(row) for row in ids], device=device)
    )
    # One key per (list, token) pair, so torch.unique counts them without a (B, V) table.
    keys, counts = torch.unique(owner * vocab + flat, return_counts=True)
    return keys // vocab, keys % vocab, counts.to(logits.dtype)
