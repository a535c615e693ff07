"""A step's sampling: each live row's next token and logprobs, with the rules a request adds on top
of its sampling parameters (its constraint's mask on the answer, the thinking budget's forced
`</think>`). The distributions themselves are r1/sampling.py's.

The rows' uniform numbers are drawn first, so if the batch's sampling raises each row is sampled
alone with the numbers it had, drawing what it would have; the rows that still raise are returned
as failures. Nothing here waits on the device unless a row wants logprobs (read here anyway): a
row whose top-p or min-p run may reach past the candidates is settled by the core once it has
read the tokens (StepSample.settle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1.engine.interface import is_device_fault
from r1.sampling import compute_logprobs, draw_tokens, settle_now, settle_rows, step_uniforms


@dataclass
class StepSample:
    reqs: list  # the requests that go on
    tokens: torch.Tensor | None  # (B,) on the logits' device; an unsettled row's holds a stand-in
    logprobs: list[list[dict]]
    failures: list  # (request, error) of the rows that failed
    # Rows whose token waits on settle (B,) bool on the device, read with the tokens; None: none.
    unsettled: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # what settle draws from
    u: torch.Tensor | None = None

    def settle(self, rows: list[int]) -> list[int]:
        """The tokens of the unsettled rows (indices into reqs), drawn over the whole vocabulary."""
        return settle_rows(
            self.logits,
            [r.params for r in self.reqs],
            [r.seq.prompt_token_ids for r in self.reqs],
            [r.seq.output_token_ids for r in self.reqs],
            self.u,
            rows,
        ).tolist()


def sample_rows(logits: torch.Tensor, reqs: list) -> StepSample:
    """The step's tokens for the core's requests, one row of logits each, without waiting on the
    device; each row's request, and which rows failed."""
    u = step_uniforms([r.params for r in reqs], [r.generator for r in reqs])
    try:
        return _sample(logits, reqs, u)
    except Exception as e:
        if is_device_fault(e):
            raise
    kept, tokens, logprobs, failures = [], [], [], []
    for row, req in enumerate(reqs):
        try:
            alone = _sample(logits[row : row + 1], [req], None if u is None else u[row : row + 1], settle=True)
        except Exception as e:
            if is_device_fault(e):
                raise
            failures.append((req, e))
            continue
        kept.append(req)
        tokens.append(alone.tokens)
        logprobs += alone.logprobs
    return StepSample(kept, torch.cat(tokens) if tokens else None, logprobs, failures)


def _sample(logits: torch.Tensor, reqs: list, u: torch.Tensor | None, settle: bool = False) -> StepSample:
    raw_logits = logits
    constrained = [i for i, r in enumerate(reqs) if r.constraint is not None and not r.reasoning.in_reasoning]
    if constrained:
        logits = logits.clone()
        for i in constrained:
            allowed = reqs[i].constraint.allowed_tokens().to(logits.device)
            logits[i, : allowed.shape[0]].masked_fill_(~allowed, float("-inf"))
            logits[i, allowed.shape[0] :] = float("-inf")  # the model's padding rows
    params = [r.params for r in reqs]
    prompt_ids, output_ids = [r.seq.prompt_token_ids for r in reqs], [r.seq.output_token_ids for r in reqs]
    tokens, unsettled = draw_tokens(logits, params, prompt_ids, output_ids, u)
    forced = [i for i, r in enumerate(reqs) if r.reasoning.budget_spent(r.params.max_reasoning_tokens)]
    for i in forced:
        tokens[i] = reqs[i].reasoning.end_id  # thinking budget spent: close it, the answer follows
    if unsettled is not None and forced:
        unsettled[forced] = False
    wanted = [p.logprobs for p in params]
    # Logprobs need the settled tokens, and reading them waits on the device anyway.
    if unsettled is not None and (settle or any(w is not None for w in wanted)):
        settle_now(tokens, unsettled, logits, params, prompt_ids, output_ids, u)
        unsettled = None
    # Logprobs are read before the next step is launched, which reading would wait for.
    return StepSample(reqs, tokens, _logprobs(raw_logits, tokens, wanted), [], unsettled, logits, u)


def token_logprobs(row: torch.Tensor, token_id: int, top_n: int | None) -> list[dict]:
    """The logprobs entry of one chosen token from its raw logits row (1, V); [] when not asked."""
    if top_n is None:
        return []
    return _logprobs(row, torch.tensor([token_id]), [top_n])[0]


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, wanted: list[int | None]) -> list[list[dict]]:
    """Each row's logprobs entry for its token, with its top wanted[i] alternatives (None: [])."""
    if all(w is None for w in wanted):
        return [[] for _ in wanted]
    top_n = max(w or 0 for w in wanted)
    chosen, top_ids, top_lps = compute_logprobs(logits, tokens, top_n)
    token_ids = tokens.tolist()
    out = []
    for i, w in enumerate(wanted):
        if w is None:
            out.append([])
            continue
        top = list(zip(top_ids[i, :w].tolist(), top_lps[i, :w].tolist()))
        out.append([{"token_id": token_ids[i], "logprob": chosen[i].item(), "top": top}])
    return out
