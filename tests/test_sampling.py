"""Sampling against probability tables worked out by hand, and SamplingParams validation.

The tables use logits = log(p) for probabilities that are exact binary fractions, so each
processor's effect can be written down as the set of tokens kept and their renormalized
probabilities.
"""

import math

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from r1 import kernels, sampling
from r1.sampling import (
    CANDIDATES,
    TRIES,
    apply_penalties,
    apply_temperature,
    compute_logprobs,
    draw,
    draw_tokens,
    filter_candidates,
    greedy_tokens,
    make_generator,
    sample_next,
    uniforms,
)
from r1.sampling_params import SamplingParams

NEG_INF = float("-inf")
# Probabilities 1/2, 1/4, 1/8, 1/16, 1/16 in shuffled places, so sorting and unsorting are tested.
TABLE = [0.125, 0.5, 0.0625, 0.25, 0.0625]
# Cumulative in probability order: 0.5 (token 1), 0.75 (+3), 0.875 (+0), 0.9375, 1.0.


def logits_of(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).log()


def kept(logits: torch.Tensor, top_k=0, top_p=1.0, min_p=0.0) -> list[set[int]]:
    """The token ids each row keeps after the filters."""
    probs, ids = filter_candidates(logits, top_k, top_p, min_p)
    return [set(row_ids[row > 0].tolist()) for row, row_ids in zip(probs, ids)]


def params(**kw) -> SamplingParams:
    return SamplingParams(**kw).with_defaults({})


def frequencies(logits: torch.Tensor, p: SamplingParams, draws: int = 20_000) -> torch.Tensor:
    """Empirical token frequencies of `draws` samples of one (1, V) row, from a fixed seed."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        batch = logits.expand(draws, -1)
        tokens = sample_next(batch, [p] * draws, [[]] * draws, [[]] * draws, [None] * draws)
    return torch.bincount(tokens, minlength=logits.shape[1]).float() / draws


# With 20,000 draws a frequency's standard deviation is at most 0.0036; 0.015 is over 4 of them.
TOL = 0.015


# --- filters: the set each keeps ---------------------------------------------------------------


@pytest.mark.parametrize(
    "top_p, expected",
    [
        (0.4, {1}),  # 0.4 <= 0.5
        (0.7, {1, 3}),  # 0.5 < 0.7 <= 0.75
        (0.8, {1, 3, 0}),  # 0.75 < 0.8 <= 0.875
        (0.99, {1, 3, 0, 2, 4}),  # 0.9375 < 0.99
    ],
)
def test_top_p_keeps_smallest_set_reaching_p(top_p, expected):
    assert kept(logits_of(TABLE), top_p=top_p) == [expected]
    # Kept probabilities are the model's, in descending order, not renormalized.
    probs, ids = filter_candidates(logits_of(TABLE), 0, top_p, 0.0)
    assert probs[0, : len(expected)].tolist() == sorted((TABLE[i] for i in expected), reverse=True)
    assert set(ids[0, : len(expected)].tolist()) == expected


def test_top_p_between_tied_tokens_keeps_one_of_them():
    # 0.875 < 0.9 <= 0.9375: one of the two 1/16 tokens joins, whichever sorts first.
    assert kept(logits_of(TABLE), top_p=0.9)[0] in ({1, 3, 0, 2}, {1, 3, 0, 4})


@pytest.mark.parametrize("top_p, count", [(0.25, 1), (0.5, 2), (0.75, 3), (0.76, 4)])
def test_top_p_stops_once_p_is_reached_exactly(top_p, count):
    # Four equal logits: softmax is exactly 1/4 each, so the cumulative sums hit p exactly.
    assert len(kept(torch.zeros(1, 4), top_p=top_p)[0]) == count


def test_filters_widen_past_the_candidates_only_when_needed():
    # 4 * CANDIDATES equal logits (exact binary fractions): a quarter of them are exactly the
    # first candidates; three quarters need the wider look. Whatever widens, the hand table
    # padded with impossible tokens keeps its own set.
    vocab = 4 * CANDIDATES
    table = torch.cat([logits_of(TABLE)[0], torch.full((vocab - 5,), NEG_INF)])
    flat = torch.zeros(vocab)
    rows = torch.stack([flat, table])
    probs, _ = filter_candidates(rows, 0, [0.25, 0.7], 0.0)
    assert probs.shape[1] == CANDIDATES  # both settled among the first candidates
    assert [len(s) for s in kept(rows, 0, [0.25, 0.7], 0.0)] == [CANDIDATES, 2]
    assert [len(s) for s in kept(rows, 0, [0.75, 0.7], 0.0)] == [3 * CANDIDATES, 2]  # ties: any of them
    # top_k keeps every token tied with its k-th, however far the ties go; min_p on a flat row
    # keeps all of it.
    assert kept(rows, [2, 2], 1.0, 0.0) == [set(range(vocab)), {1, 3}]
    assert kept(rows, 0, 1.0, [0.5, 0.3]) == [set(range(vocab)), {1, 3}]


def test_top_p_always_keeps_top_token_and_disables_at_one():
    assert kept(logits_of(TABLE), top_p=0.01) == [{1}]
    assert kept(logits_of(TABLE), top_p=1.0, min_p=1e-6) == [{0, 1, 2, 3, 4}]


def test_top_k():
    assert kept(logits_of(TABLE), top_k=2) == [{1, 3}]
    assert kept(logits_of(TABLE), top_k=1) == [{1}]
    for disabled in (0, 5, 9):  # -1 is stored as 0 by SamplingParams
        assert kept(logits_of(TABLE), top_k=disabled, top_p=0.8) == [{1, 3, 0}]


def test_top_p_applies_to_what_top_k_kept():
    # top_k=3 leaves 1/2, 1/4, 1/8, renormalized to 4/7, 2/7, 1/7: 4/7 + 2/7 reaches 0.8.
    # Over the whole table (1/2 + 1/4 = 0.75 < 0.8) top_p alone needs a third token.
    assert kept(logits_of(TABLE), top_k=3, top_p=0.8) == [{1, 3}]
    assert kept(logits_of(TABLE), top_p=0.8) == [{1, 3, 0}]


def test_min_p():
    # Threshold = min_p * 0.5.
    assert kept(logits_of(TABLE), min_p=0.2) == [{1, 3, 0}]  # 0.1: drops the 1/16s
    assert kept(logits_of(TABLE), min_p=0.3) == [{1, 3}]  # 0.15: drops 1/8 too
    assert kept(logits_of(TABLE), min_p=1.0) == [{1}]


def test_per_row_values_give_each_row_its_own_filters():
    logits = logits_of(TABLE, TABLE, TABLE)
    assert kept(logits, [2, 0, 0], [1.0, 0.8, 1.0], [0.0, 0.0, 0.3]) == [{1, 3}, {1, 3, 0}, {1, 3}]


def reference_kept(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """The filters by sorting the whole vocabulary (no ties in random logits)."""
    probs, order = row.softmax(0).sort(descending=True)
    n = len(order) if top_k == 0 else top_k
    probs = probs[:n] / probs[:n].sum()
    needed = (probs.cumsum(0) - probs < top_p) if top_p < 1 else torch.ones(n, dtype=torch.bool)
    above = probs >= min_p * probs[0]
    return set(order[:n][needed & above].tolist())


def test_filters_match_sorting_the_whole_vocabulary():
    gen = torch.Generator().manual_seed(3)
    # Peaked rows settle among the first candidates, flat ones (small spread) need more.
    spread = torch.tensor([8.0, 4.0, 1.0, 0.1, 8.0, 0.05, 2.0, 0.5])[:, None]
    logits = torch.randn(8, 5000, generator=gen) * spread
    settings = [
        (0, 0.95, 0.0),
        (40, 0.9, 0.0),
        (0, 0.5, 0.0),
        (0, 0.95, 0.0),
        (0, 1.0, 0.05),
        (100, 1.0, 0.0),
        (20, 0.8, 0.1),
        (0, 0.99, 0.5),
    ]
    top_k, top_p, min_p = zip(*settings)
    got = kept(logits, list(top_k), list(top_p), list(min_p))
    expected = [reference_kept(row, *s) for row, s in zip(logits, settings)]
    assert got == expected
    assert max(len(s) for s in got) > CANDIDATES  # some row needed the wider look


def test_temperature_reshapes_distribution():
    # T=2 takes square roots: 0.64, 0.16, 0.16, 0.04 -> 0.8, 0.4, 0.4, 0.2 over 1.8.
    hot = apply_temperature(logits_of([0.64, 0.16, 0.16, 0.04]), 2.0).softmax(-1)[0]
    assert torch.allclose(hot, torch.tensor([4 / 9, 2 / 9, 2 / 9, 1 / 9]), atol=1e-6)
    # T=0.5 squares: 0.5, 0.25, 0.25 -> 0.25, 0.0625, 0.0625 over 0.375.
    cold = apply_temperature(logits_of([0.5, 0.25, 0.25]), 0.5).softmax(-1)[0]
    assert torch.allclose(cold, torch.tensor([2 / 3, 1 / 6, 1 / 6]), atol=1e-6)
    # 0 (greedy) and 1 leave the logits alone.
    assert torch.equal(apply_temperature(logits_of(TABLE), 0.0), logits_of(TABLE))


def test_per_row_temperature_leaves_rows_at_0_and_1_untouched():
    logits = logits_of(TABLE, TABLE, TABLE)
    out = apply_temperature(logits, [1.0, 0.5, 0.0])
    assert torch.equal(out[[0, 2]], logits[[0, 2]]) and torch.allclose(out[1], logits[1] * 2)


# --- penalties: exact logits --------------------------------------------------------------------


def test_penalties_exact_logits():
    row = [2.0, -1.0, 0.5, -0.5, 1.0]
    logits = torch.tensor([row, row, row])
    prompt = [[0, 1], [0, 1], [0, 1]]
    output = [[2, 2, 3], [2, 2, 3], [2, 2, 3]]
    ps = [
        params(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        params(),
        params(presence_penalty=1.0),
    ]
    out = apply_penalties(logits, prompt, output, ps)
    # Row 0, repetition over prompt+output {0,1,2,3}: 2->1, -1->-2, 0.5->0.25, -0.5->-1.
    # Then output counts {2: 2, 3: 1}: 0.25 - 2*0.5 - 0.25 = -1.0; -1.0 - 0.5 - 0.25 = -1.75.
    assert out[0].tolist() == [1.0, -2.0, -1.0, -1.75, 1.0]
    assert out[1].tolist() == row
    # Presence counts each output token once and never the prompt's.
    assert out[2].tolist() == [2.0, -1.0, -0.5, -1.5, 1.0]
    assert logits[0].tolist() == row  # the input is not modified


def test_negative_frequency_penalty_encourages():
    out = apply_penalties(torch.zeros(1, 3), [[1]], [[0, 0, 0]], [params(frequency_penalty=-2.0)])
    assert out[0].tolist() == [6.0, 0.0, 0.0]


def test_greedy_takes_argmax_of_penalized_logits():
    logits = torch.tensor([[2.0, 1.9, -3.0], [0.1, 0.3, 0.2]])
    ps = [params(temperature=0, repetition_penalty=2.0), params(temperature=0)]
    # Row 0: token 0 was generated, 2.0 / 2 = 1.0 < 1.9.
    assert sample_next(logits, ps, [[], []], [[0], []], [None, None]).tolist() == [1, 1]


@pytest.mark.parametrize("vocab", [151936, 1001])  # R1's vocabulary, and one that 64 chunks do not divide
def test_greedy_tokens_is_argmax_first_on_ties(vocab):
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(3))
    logits[1, [vocab - 1, 700, 5]] = 50.0  # tied in three chunks: the first wins
    logits[2, [701, 700]] = 50.0  # tied within one
    logits[3, [900, 40]] = float("nan")  # as argmax: the first NaN
    logits[4] = float("-inf")
    got = greedy_tokens(logits)
    assert torch.equal(got, logits.argmax(dim=1))
    assert got[1:5].tolist() == [5, 700, 40, 0]


@pytest.mark.skipif(kernels.op("softmax_topk") is None, reason="needs r1's CPU kernels")
def test_filters_keep_the_same_tokens_with_or_without_the_kernel(monkeypatch):
    logits = torch.randn(4, 151936, generator=torch.Generator().manual_seed(4)) * 2
    logits[:, :40] += 9  # a model's few dozen likely tokens
    logits[3, 40:1000] += 9  # a thousand: past the first candidates
    args = (logits, [0, 20, 0, 0], [0.95, 1.0, 0.5, 0.95], [0.0, 0.0, 0.1, 0.0])
    temperature = [0.6, 1.0, 0.6, 1.0]
    ours = filter_candidates(*args, temperature=temperature)
    monkeypatch.setattr(kernels, "op_for", lambda name, x: None)
    portable = filter_candidates(*args, temperature=temperature)
    assert ours[0].shape == portable[0].shape == (4, 151936)  # row 3 widened to the whole vocabulary
    for probs, ids, want_probs, want_ids in zip(*ours, *portable):
        kept = want_probs > 0
        assert torch.equal(probs > 0, kept) and torch.equal(ids[kept], want_ids[kept])
        assert torch.allclose(probs, want_probs, rtol=1e-5, atol=1e-9)


# --- draws: empirical frequencies against the tables --------------------------------------------


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({}, TABLE),
        ({"top_k": 2}, [0, 2 / 3, 0, 1 / 3, 0]),
        ({"top_p": 0.8}, [1 / 7, 4 / 7, 0, 2 / 7, 0]),
        ({"min_p": 0.3}, [0, 2 / 3, 0, 1 / 3, 0]),
        # T=0.5 squares: 1/64, 1/4, 1/256, 1/16, 1/256 over 0.3359375.
        ({"temperature": 0.5}, [x * x / 0.3359375 for x in TABLE]),
    ],
)
def test_draw_frequencies_match_table(kw, expected):
    freq = frequencies(logits_of(TABLE), params(**kw))
    expected = torch.tensor(expected)
    assert torch.all((freq - expected).abs() < TOL), (freq, expected)
    assert torch.all(freq[expected == 0] == 0)  # filtered tokens are never drawn


# A row whose kept tokens reach past the candidates: probabilities in proportion to
# exp(-0.02 i) over 128 tokens in shuffled places, so its first 64 hold 78% of the mass.
WIDE_VOCAB = 128


def wide_row(temperature: float) -> torch.Tensor:
    place = torch.randperm(WIDE_VOCAB, generator=torch.Generator().manual_seed(6))
    logits = torch.empty(1, WIDE_VOCAB)
    logits[0, place] = -0.02 * torch.arange(WIDE_VOCAB, dtype=torch.float32) * temperature
    return logits


@pytest.mark.parametrize(
    "kw",
    [
        {"top_p": 0.95},  # ~105 tokens; a draw is rejected 5% of the time
        {"top_p": 0.8, "temperature": 0.6},  # 67 tokens: rejected 20%, so some rows run out of tries
        {"top_p": 0.95, "min_p": 0.2},  # min-p's 81 tokens: nothing to reject
    ],
)
def test_wide_rows_draw_the_kept_distribution(monkeypatch, kw):
    p = params(**{"temperature": 1.0, **kw})
    logits = wide_row(p.temperature)
    keep = reference_kept(logits[0] / p.temperature, 0, p.top_p, p.min_p)
    assert len(keep) > CANDIDATES  # kept past the candidates: the row is sampled over the vocabulary
    probs = (logits[0] / p.temperature).softmax(0)
    expected = torch.zeros(WIDE_VOCAB)
    expected[list(keep)] = probs[list(keep)] / probs[list(keep)].sum()
    sorted_rows = []  # rows rejected on every try, filtered by sorting instead
    exact = sampling.filter_candidates
    monkeypatch.setattr(sampling, "filter_candidates", lambda x, *a: sorted_rows.append(len(x)) or exact(x, *a))
    freq = frequencies(logits, p, draws=100_000)
    assert torch.all(freq[expected == 0] == 0)  # filtered tokens are never drawn
    # Over ~100 tokens, sampling noise puts the total variation near 0.013.
    assert 0.5 * (freq - expected).abs().sum() < 0.03
    if p.top_p == 0.8:
        assert sum(sorted_rows) > 0  # 0.2 ** 3 of 100,000 rows: ~800


def test_wide_rows_keep_every_token_tied_with_the_kth():
    # top-k on a flat row keeps its ties however far they go, here every token.
    freq = frequencies(torch.zeros(1, WIDE_VOCAB), params(temperature=0.7, top_k=2))
    assert torch.all((freq - 1 / WIDE_VOCAB).abs() < TOL)


class DeviceReads(TorchDispatchMode):
    """Counts the reads of numbers computed from `source` (nonzero, item, bool): on a GPU each
    waits for the device's queue to drain."""

    READS = {torch.ops.aten.nonzero, torch.ops.aten._local_scalar_dense, torch.ops.aten.is_nonzero}

    def __init__(self, source: torch.Tensor):
        super().__init__()
        self.derived = {id(source): source}  # held, so that ids are not reused
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        from_source = any(id(x) in self.derived for x in inputs)
        self.count += from_source and func.overloadpacket in self.READS
        out = func(*args, **(kwargs or {}))
        if from_source:
            self.derived.update((id(x), x) for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor))
        return out


def test_sampling_waits_on_the_device_once_a_step():
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(8))
    logits[:, :10] += 12  # a model's few likely tokens: every row settles among the candidates
    batch = [
        params(temperature=0),
        params(top_p=0.95),
        params(temperature=0.6, top_p=0.95),
        params(temperature=1.0),
        params(top_k=20, min_p=0.05),
        params(temperature=0),
    ]
    gens = [None, make_generator(1), None, make_generator(2), None, None]
    with DeviceReads(logits) as reads:
        sample_next(logits, batch, [[]] * 6, [[]] * 6, gens)
    assert reads.count == 1  # which rows were settled among the candidates
    with DeviceReads(logits) as reads:
        sample_next(logits, [params(temperature=0)] * 6, [[]] * 6, [[]] * 6, [None] * 6)
    assert reads.count == 0


def mixed_batch(rows: int = 48) -> tuple[torch.Tensor, list[SamplingParams], list]:
    """R1-sized logits, peaked and flat rows, under every kind of setting, each row seeded."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(rows, 151936, generator=gen)
    logits[::2, :30] += 10  # peaked: settled among the candidates; the odd rows are flat
    settings = [
        dict(temperature=0),
        dict(temperature=0.6, top_p=0.95),
        dict(temperature=1.0),
        dict(temperature=0.8, min_p=0.05),
        dict(top_k=40, top_p=0.9),
        dict(temperature=1.3, top_p=0.99, min_p=0.5),
    ]
    ps = [params(**settings[i % len(settings)]) for i in range(rows)]
    return logits, ps, [make_generator(100 + i) for i in range(rows)]


@pytest.mark.parametrize(
    "where",
    [
        "pytorch",  # PyTorch's softmax and topk in place of r1's kernel
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
    ],
)
def test_same_seeds_same_tokens_on_every_path(monkeypatch, where):
    logits, ps, gens = mixed_batch()
    expected = sample_next(logits, ps, [[]] * len(ps), [[]] * len(ps), gens)
    logits, ps, gens = mixed_batch()
    if where == "pytorch":
        monkeypatch.setattr(kernels, "op_for", lambda name, x: None)
    else:
        logits = logits.to(where)
    got = sample_next(logits, ps, [[]] * len(ps), [[]] * len(ps), gens)
    assert got.device == logits.device
    # Equal, bar a uniform number landing within rounding of a probability's edge (~1e-7 a row).
    assert torch.equal(got.cpu(), expected)


def test_seeded_row_draws_match_table():
    g = make_generator(1234)
    tokens = [draw(logits_of(TABLE).softmax(dim=1), uniforms([g], 1)[:, 0]).item() for _ in range(4000)]
    freq = torch.bincount(torch.tensor(tokens), minlength=5).float() / 4000
    assert torch.all((freq - torch.tensor(TABLE)).abs() < 0.03)  # std <= 0.008 at 4,000 draws


# --- seeds ---------------------------------------------------------------------------------------


def run_seeded(batch: list[tuple[SamplingParams, int | None]], steps: int = 25) -> list[list[int]]:
    """Token sequences for each row of `batch`, all rows given the same logits every step,
    with the output fed back through the penalties."""
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(99))
    logits = logits.expand(len(batch), -1)
    ps = [p for p, _ in batch]
    gens = [make_generator(seed) for _, seed in batch]
    outputs = [[] for _ in batch]
    for _ in range(steps):
        tokens = sample_next(logits, ps, [[0, 1]] * len(batch), outputs, gens)
        for out, t in zip(outputs, tokens.tolist()):
            out.append(t)
    return outputs


def test_same_seed_same_tokens_alone_or_batched():
    target = params(temperature=0.9, top_p=0.95, presence_penalty=0.5)
    with torch.random.fork_rng():
        alone = run_seeded([(target, 7)])
        batched = run_seeded(
            [
                (params(temperature=1.0), None),
                (params(top_k=3), 8),
                (params(temperature=0), None),
                (target, 7),
                (params(top_k=500), 9),
            ]
        )
    assert batched[3] == alone[0]


def test_different_seeds_differ_and_seeds_repeat():
    p = params(temperature=1.0)
    with torch.random.fork_rng():
        a, b, a_again = run_seeded([(p, 1), (p, 2), (p, 1)])
    assert a == a_again
    assert a != b


def test_make_generator():
    assert make_generator(None) is None
    g1, g2 = make_generator(5), make_generator(5)
    assert g1.generator.device == torch.device("cpu")  # the same draws whatever device samples
    assert g1.take(3) + g1.take(300) == g2.take(303)


def test_a_generator_hands_out_its_seeds_numbers_in_order():
    g, plain = make_generator(7), torch.Generator().manual_seed(7)
    for n in (4, 4, 250, 9, 4):  # across the blocks it draws ahead
        assert torch.equal(uniforms([g], n)[0], torch.rand(n, generator=plain))


def test_sample_next_requires_concrete_params():
    with pytest.raises(ValueError, match="with_defaults"):
        sample_next(logits_of(TABLE), [SamplingParams()], [[]], [[]], [None])


# --- logprobs ------------------------------------------------------------------------------------


def test_compute_logprobs_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    chosen_ids = torch.tensor([4, 0, 49])
    chosen, top_ids, top_lp = compute_logprobs(logits, chosen_ids, 3)
    ref = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(chosen, ref[torch.arange(3), chosen_ids])
    assert torch.equal(top_ids, ref.topk(3, dim=-1).indices)
    assert torch.allclose(top_lp, ref.topk(3, dim=-1).values)
    _, ids0, lp0 = compute_logprobs(logits, chosen_ids, 0)
    assert ids0.shape == (3, 0) and lp0.shape == (3, 0)
    # On the hand table the numbers are exact: log(1/2) for the top token.
    chosen, _, top = compute_logprobs(logits_of(TABLE), torch.tensor([3]), 1)
    assert math.isclose(chosen.item(), math.log(0.25), rel_tol=1e-6)
    assert math.isclose(top.item(), math.log(0.5), rel_tol=1e-6)


# --- SamplingParams ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, error, message",
    [
        ({"temperature": -0.1}, ValueError, "temperature must be a finite number >= 0.0, got -0.1"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"top_p": 0}, ValueError, r"top_p must be a finite number in \(0.0, 1.0\], got 0"),
        ({"top_p": 1.5}, ValueError, r"top_p must be a finite number in \(0.0, 1.0\], got 1.5"),
        ({"top_k": -2}, ValueError, "top_k must be -1 or 0 .* got -2"),
        ({"top_k": 2.5}, TypeError, "top_k must be an int, got 2.5"),
        ({"min_p": 1.1}, ValueError, "min_p"),
        (
            {"top_k": 2**63},
            ValueError,
            r"top_k must be -1 or 0 \(disabled\) or in \[1, 2147483647\], got 9223372036854775808",
        ),
        (
            {"repetition_penalty": 0},
            ValueError,
            r"repetition_penalty must be a finite number in \[0.01, 100.0\], got 0",
        ),
        ({"repetition_penalty": 1e300}, ValueError, "repetition_penalty"),
        ({"presence_penalty": 2.5}, ValueError, r"presence_penalty .*\[-2.0, 2.0\], got 2.5"),
        ({"frequency_penalty": -3}, ValueError, "frequency_penalty"),
        ({"stop": [1, 2]}, TypeError, r"stop must be a str or a list of str, got \[1, 2\]"),
        ({"stop": 5}, TypeError, "stop must be a str or a list of str, got 5"),
        ({"stop": ["a", ""]}, ValueError, "stop strings must be non-empty"),
        ({"stop": ["x"] * 17}, ValueError, "at most 16 stop strings, got 17"),
        ({"stop": "x" * 513}, ValueError, "stop strings must be at most 512 characters, got one of 513"),
        ({"stop_token_ids": ["1"]}, TypeError, "stop_token_ids must be a list of int"),
        ({"stop_token_ids": [2**32]}, ValueError, "stop_token_ids must lie in"),
        ({"stop_token_ids": list(range(65))}, ValueError, "at most 64 stop_token_ids"),
        ({"n": 0}, ValueError, "n must be >= 1, got 0"),
        ({"n": True}, TypeError, "n must be an int, got True"),
        ({"max_tokens": 0}, ValueError, "max_tokens must be >= 1, got 0"),
        ({"logprobs": 21}, ValueError, r"logprobs must be in \[0, 20\], got 21"),
        ({"logprobs": -1}, ValueError, "logprobs"),
        ({"seed": "1"}, TypeError, "seed must be an int"),
        ({"seed": 2**64}, ValueError, r"seed must be in \[-9223372036854775808, 9223372036854775807\]"),
        ({"seed": -(2**63) - 1}, ValueError, "seed must be in"),
        ({"ignore_eos": 1}, TypeError, "ignore_eos must be a bool"),
    ],
)
def test_validation_errors(kw, error, message):
    with pytest.raises(error, match=message) as refused:
        SamplingParams(**kw)
    if error is ValueError:  # names the field, for an API's 400
        assert refused.value.param == next(iter(kw))


def test_tiny_temperatures_are_greedy():
    # logits / 1e-40 would overflow float32 to inf, and the softmax to NaN.
    assert SamplingParams(temperature=1e-40).temperature == 0 and SamplingParams(temperature=1e-40).greedy
    assert SamplingParams(temperature=1e-5).temperature == 1e-5


def test_stop_is_normalized_to_tuples():
    assert SamplingParams(stop="</s>").stop == ("</s>",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)
    assert SamplingParams(top_k=-1).top_k == 0
    hash(SamplingParams(stop=["a"]))  # frozen and hashable
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 1.0


def test_with_defaults_fills_r1_generation_config():
    r1 = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "bos_token_id": 151646}
    p = SamplingParams(max_tokens=10).with_defaults(r1)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.6, 0.95, 0, 10)
    # Fields the user set win; the rest fall back to the neutral values.
    p = SamplingParams(temperature=0, top_k=5).with_defaults(r1)
    assert (p.temperature, p.top_p, p.top_k) == (0, 0.95, 5) and p.greedy
    p = SamplingParams().with_defaults({"top_k": None})
    assert (p.temperature, p.top_p, p.top_k) == (1.0, 1.0, 0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams().with_defaults({"top_p": 2.0})  # defaults are validated too


def test_a_large_top_k_widens_only_its_own_rows(monkeypatch):
    widths = []
    real = sampling._softmax_topk

    def recording(logits, temperature, width):
        widths.append((len(logits), width))
        return real(logits, temperature, width)

    monkeypatch.setattr(sampling, "_softmax_topk", recording)
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(5))
    ps = [params(top_p=0.9, temperature=0.6), params(top_k=500, temperature=0.6), params(top_k=20)]
    sample_next(logits, ps, [[]] * 3, [[]] * 3, [make_generator(i) for i in range(3)])
    # Both narrow rows among 64 candidates; the top_k=500 row alone among 501.
    assert widths[:2] == [(2, CANDIDATES), (1, 501)]


def test_the_draw_needs_no_device_value_on_the_host():
    # On a GPU a step's draw must not wait for the device: the meta device has no values at all,
    # so the draw running there shows that no branch or size depends on one. Rows at R1's
    # settings, greedy, top-k, min-p and plain temperature, in one batch.
    settings = [
        dict(temperature=0.6, top_p=0.95),
        dict(temperature=0),
        dict(temperature=0.7, top_k=20),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=0.8),
    ]
    ps = [SamplingParams(**s, seed=i).with_defaults({}) for i, s in enumerate(settings)]
    logits = torch.empty(len(ps), 151936, device="meta")
    u = uniforms([make_generator(i) for i in range(len(ps))], TRIES + 1)
    tokens, unsettled = draw_tokens(logits, ps, [[]] * len(ps), [[]] * len(ps), u)
    assert tokens.device.type == unsettled.device.type == "meta" and tokens.shape == unsettled.shape == (len(ps),)
