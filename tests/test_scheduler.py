"""Scheduler: the token budget, chunked prefill mixed with decodes, admission, preemption, aborts.

A tiny fake engine drives it: it "samples" a dummy token whenever a scheduled sequence reaches the
end of its known tokens and finishes the sequence at max_tokens. Every step checks the invariants
(budget, no empty entries, block tables sized exactly, reference counts matching the tables).
"""

import random
from collections import Counter

import pytest

from r1.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from r1.engine.sequence import Sequence, SequenceStatus


class FakeEngine:
    def __init__(self, **config):
        self.sched = Scheduler(SchedulerConfig(**config))
        self.bm = self.sched.block_manager
        self.next_id = 0
        self.finished: list[Sequence] = []

    def add(self, prompt, max_tokens=4) -> Sequence:
        seq = Sequence(self.next_id, list(prompt), max_tokens)
        self.next_id += 1
        self.sched.add(seq)
        return seq

    def step(self) -> list[ScheduledSeq]:
        scheduled = self.sched.schedule()
        check_invariants(self.sched, scheduled)
        self.sched.update_after_step(scheduled)
        for s in scheduled:
            if s.samples:
                s.seq.append_token(10_000 + s.seq.seq_id)
                if s.seq.num_output_tokens >= s.seq.max_tokens:
                    self.sched.finish(s.seq, "length")
                    self.finished.append(s.seq)
        return scheduled

    def run(self, max_steps=10_000) -> int:
        steps = 0
        while self.sched.has_unfinished():
            assert self.step(), "a step scheduled nothing while work was left"
            steps += 1
            assert steps < max_steps
        return steps

    def assert_no_leaks(self):
        assert not self.sched.has_unfinished()
        assert self.bm.num_free_blocks == self.bm.num_blocks and self.bm.usage == 0
        assert all(b.ref_count == 0 for b in self.bm.blocks)


def check_invariants(sched: Scheduler, scheduled: list[ScheduledSeq]):
    cfg, bm = sched.config, sched.block_manager
    assert sum(s.num_new_tokens for s in scheduled) <= cfg.max_num_batched_tokens
    assert all(s.num_new_tokens > 0 for s in scheduled)
    assert len({s.seq.seq_id for s in scheduled}) == len(scheduled)
    assert len(sched.running) <= cfg.max_num_seqs
    for s in scheduled:
        seq = s.seq
        assert seq.status is SequenceStatus.RUNNING
        end = seq.num_computed_tokens + s.num_new_tokens
        assert end <= seq.num_tokens
        assert len(seq.block_table) == -(-end // cfg.block_size)
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    refs = Counter(b for seq in sched.running for b in seq.block_table)
    assert [b.ref_count for b in bm.blocks] == [refs[i] for i in range(bm.num_blocks)]
    assert bm.num_free_blocks == bm.num_blocks - len(refs)


def prompt(start, n):
    return list(range(start, start + n))


def plan(scheduled):
    return [(s.seq.seq_id, s.num_new_tokens, s.samples) for s in scheduled]


@pytest.mark.parametrize(
    "field", ["num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"]
)
def test_config_rejects_non_positive_values(field):
    kwargs = {"num_blocks": 8, field: 0}
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**kwargs)


def test_add_rejects_sequences_that_could_never_finish():
    sched = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, max_model_len=32))
    with pytest.raises(ValueError, match="empty"):
        sched.add(Sequence(0, [], 4))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(Sequence(1, prompt(0, 30), 3))
    with pytest.raises(ValueError, match="KV cache"):
        sched.add(Sequence(2, prompt(0, 10), 8))  # 17 tokens of KV: 5 blocks of 4
    sched.add(Sequence(3, prompt(0, 10), 7))  # 16 tokens of KV fit exactly
    assert sched.num_waiting == 1


def test_samples_is_fixed_when_scheduled():
    seq = Sequence(0, prompt(0, 5), 4)
    assert not ScheduledSeq(seq, 3).samples
    done = ScheduledSeq(seq, 5)
    assert done.samples
    seq.num_computed_tokens = 5  # what update_after_step does
    seq.append_token(7)
    assert done.samples


def test_chunked_prefill_mixes_with_decodes_within_the_budget():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_batched_tokens=16)
    a = eng.add(prompt(0, 5), max_tokens=10)
    assert plan(eng.step()) == [(a.seq_id, 5, True)]
    b = eng.add(prompt(100, 40), max_tokens=2)
    # b's 40-token prompt takes what the budget leaves after a's decode, 15 tokens a step.
    assert plan(eng.step()) == [(a.seq_id, 1, True), (b.seq_id, 15, False)]
    assert plan(eng.step()) == [(a.seq_id, 1, True), (b.seq_id, 15, False)]
    assert plan(eng.step()) == [(a.seq_id, 1, True), (b.seq_id, 10, True)]
    assert b.num_computed_tokens == 40 and b.num_output_tokens == 1
    assert plan(eng.step()) == [(a.seq_id, 1, True), (b.seq_id, 1, True)]
    assert b.is_finished and b.finish_reason == "length"
    eng.run()
    assert a.num_output_tokens == 10
    eng.assert_no_leaks()


def test_the_budget_goes_out_in_admission_order():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_batched_tokens=3)
    seqs = [eng.add(prompt(10 * i, 2), max_tokens=3) for i in range(3)]
    # Step 1: the first prompt fits, the second gets the one token left.
    assert plan(eng.step()) == [(0, 2, True), (1, 1, False)]
    assert plan(eng.step()) == [(0, 1, True), (1, 1, True), (2, 1, False)]
    # Budget of 3 goes to the running ones in admission order: the third waits a step.
    assert plan(eng.step()) == [(0, 1, True), (1, 1, True), (2, 1, True)]
    eng.run()
    assert all(s.num_output_tokens == 3 for s in seqs)
    eng.assert_no_leaks()


def test_max_num_seqs_caps_the_running_set():
    eng = FakeEngine(num_blocks=64, block_size=4, max_num_seqs=2)
    seqs = [eng.add(prompt(10 * i, 3), max_tokens=3) for i in range(5)]
    assert [s.seq.seq_id for s in eng.step()] == [0, 1]
    assert eng.sched.num_running == 2 and eng.sched.num_waiting == 3
    while eng.sched.has_unfinished():
        eng.step()
        assert eng.sched.num_running <= 2
    assert [s.seq_id for s in eng.finished] == [0, 1, 2, 3, 4]  # first come, first served
    assert all(s.num_output_tokens == 3 for s in seqs)
    eng.assert_no_leaks()


def test_requests_joining_mid_flight():
    eng = FakeEngine(num_blocks=64, block_size=4)
    a = eng.add(prompt(0, 6), max_tokens=8)
    eng.step()
    eng.step()
    b, c = eng.add(prompt(50, 9), max_tokens=3), eng.add(prompt(80, 2), max_tokens=1)
    assert plan(eng.step()) == [(a.seq_id, 1, True), (b.seq_id, 9, True), (c.seq_id, 2, True)]
    assert c.is_finished and eng.sched.num_running == 2
    eng.run()
    assert [s.num_output_tokens for s in (a, b, c)] == [8, 3, 1]
    eng.assert_no_leaks()


def test_shared_prefix_is_computed_once():
    eng = FakeEngine(num_blocks=64, block_size=4)
    system = prompt(1000, 32)
    a = eng.add(system + [1, 2, 3], max_tokens=4)
    assert plan(eng.step()) == [(a.seq_id, 35, True)]
    b = eng.add(system + [7, 8], max_tokens=4)
    assert plan(eng.step()) == [(a.seq_id, 1, True), (b.seq_id, 2, True)]
    assert a.num_cached_tokens == 0 and b.num_cached_tokens == 32
    assert b.block_table[:8] == a.block_table[:8]
    assert all(eng.bm.blocks[i].ref_count == 2 for i in a.block_table[:8])
    assert (eng.bm.prefix_queries, eng.bm.prefix_hits) == (35 + 34, 32)
    eng.run()
    eng.assert_no_leaks()


def test_identical_prompt_still_computes_its_last_token():
    eng = FakeEngine(num_blocks=64, block_size=4)
    same = prompt(0, 8)
    eng.add(same, max_tokens=1)
    eng.run()
    again = eng.add(same, max_tokens=1)
    # Both blocks are cached, but the last token's logits are needed: the second block is rerun.
    assert plan(eng.step()) == [(again.seq_id, 4, True)]
    assert again.num_cached_tokens == 4 and again.num_output_tokens == 1


def test_running_sequence_preempts_the_newest_and_it_is_recomputed():
    # 6 blocks of 4: two sequences growing to 19 tokens of KV (5 blocks) each cannot both fit.
    eng = FakeEngine(num_blocks=6, block_size=4)
    a, b = eng.add(prompt(0, 8), max_tokens=12), eng.add(prompt(100, 8), max_tokens=12)
    eng.step()
    while eng.sched.num_preemptions == 0:
        scheduled = eng.step()
    # a, the older, kept running and took the blocks; b went back to the front of the queue.
    assert plan(scheduled)[0][0] == a.seq_id and b.seq_id not in [s.seq.seq_id for s in scheduled]
    assert b.status is SequenceStatus.WAITING and eng.sched.waiting[0] is b
    assert b.num_computed_tokens == 0 and b.block_table == []
    outputs_before = b.num_output_tokens
    eng.run()
    # b recomputed prompt + outputs and carried on where it stopped: no output lost or repeated.
    assert b.num_output_tokens == 12 and b.token_ids[:8] == prompt(100, 8)
    assert b.output_token_ids == [10_000 + b.seq_id] * 12 and outputs_before > 0
    assert a.num_output_tokens == 12
    eng.assert_no_leaks()


def test_a_sequence_may_preempt_itself_and_recompute_from_the_cache():
    eng = FakeEngine(num_blocks=4, block_size=4)
    a, b = eng.add(prompt(0, 6), max_tokens=2), eng.add(prompt(100, 8), max_tokens=2)
    assert plan(eng.step()) == [(a.seq_id, 6, True), (b.seq_id, 8, True)]
    # b's ninth token needs a third block; none is free and b is the newest: it gives way itself,
    # and nobody is admitted in the step that preempted.
    assert plan(eng.step()) == [(a.seq_id, 1, True)]
    assert eng.sched.num_preemptions == 1 and eng.sched.waiting[0] is b and a.is_finished
    # Re-admitted: its two full prompt blocks are still cached; only the sampled token is rerun.
    assert plan(eng.step()) == [(b.seq_id, 1, True)]
    assert b.num_cached_tokens == 8 and b.is_finished
    eng.assert_no_leaks()


def test_preempted_sequence_goes_first_but_not_in_the_step_that_preempted_it():
    eng = FakeEngine(num_blocks=4, block_size=4, max_num_batched_tokens=5, enable_prefix_caching=False)
    a, b = eng.add(prompt(0, 4), max_tokens=8), eng.add(prompt(100, 8), max_tokens=2)
    assert plan(eng.step()) == [(a.seq_id, 4, True), (b.seq_id, 1, False)]
    assert plan(eng.step()) == [(a.seq_id, 1, True), (b.seq_id, 4, False)]
    assert plan(eng.step()) == [(a.seq_id, 1, True), (b.seq_id, 3, True)]
    c = eng.add(prompt(200, 2), max_tokens=1)
    # b's ninth token needs a third block: b preempts itself. Its two freed blocks would hold its
    # next chunk, but re-admitting it at once would only thrash, and c must not overtake it.
    assert plan(eng.step()) == [(a.seq_id, 1, True)]
    assert list(eng.sched.waiting) == [b, c]
    eng.run()
    assert eng.finished.index(b) < eng.finished.index(c)
    eng.assert_no_leaks()


def test_aborts_of_waiting_and_running_sequences_leak_nothing():
    eng = FakeEngine(num_blocks=16, block_size=4, max_num_batched_tokens=8, max_num_seqs=2)
    long = eng.add(prompt(0, 30), max_tokens=4)  # prefills in chunks of 8
    short = eng.add(prompt(100, 3), max_tokens=4)
    queued = eng.add(prompt(200, 3), max_tokens=4)
    eng.step()
    assert long.num_computed_tokens == 8 and len(long.block_table) == 2
    eng.sched.finish(queued, "abort")  # never admitted
    eng.sched.finish(long, "abort")  # mid-prefill
    assert queued.finish_reason == long.finish_reason == "abort"
    assert queued.is_finished and long.is_finished and long.block_table == []
    assert eng.sched.num_waiting == 1 and eng.sched.num_running == 0
    eng.sched.finish(long, "abort")  # a second abort is a no-op
    eng.run()
    assert short.num_output_tokens == 4
    eng.assert_no_leaks()


def test_abort_while_the_step_runs():
    eng = FakeEngine(num_blocks=16, block_size=4)
    a, b = eng.add(prompt(0, 9), max_tokens=4), eng.add(prompt(50, 9), max_tokens=4)
    scheduled = eng.sched.schedule()
    eng.sched.finish(a, "abort")  # arrives between schedule() and update_after_step()
    eng.sched.update_after_step(scheduled)
    assert a.num_computed_tokens == 0 and b.num_computed_tokens == 9
    assert eng.bm.lookup_prefix(Sequence(9, prompt(0, 9), 1)) == []  # a's blocks were not cached
    eng.sched.finish(b, "abort")
    eng.assert_no_leaks()


@pytest.mark.parametrize("seed", range(8))
def test_random_workload_finishes_everything_without_leaks(seed):
    rng = random.Random(seed)
    caching = seed % 2 == 0
    eng = FakeEngine(
        num_blocks=24,
        block_size=4,
        max_num_seqs=5,
        max_num_batched_tokens=20,
        max_model_len=96,
        enable_prefix_caching=caching,
    )
    system = prompt(500, 12)
    expected, aborted = {}, set()
    for _ in range(400):
        if rng.random() < 0.3 and len(expected) < 40:
            body = prompt(rng.randrange(1000), rng.randint(1, 30))
            seq = eng.add((system if rng.random() < 0.5 else []) + body, max_tokens=rng.randint(1, 30))
            expected[seq.seq_id] = seq
        if rng.random() < 0.03:
            live = [*eng.sched.waiting, *eng.sched.running]
            if live:
                victim = rng.choice(live)
                eng.sched.finish(victim, "abort")
                aborted.add(victim.seq_id)
        if eng.sched.has_unfinished():
            assert eng.step()
    eng.run()
    for seq in expected.values():
        assert seq.is_finished
        if seq.seq_id not in aborted:
            assert seq.finish_reason == "length" and seq.num_output_tokens == seq.max_tokens
    assert eng.sched.num_preemptions > 0  # the pool is small enough that this test preempts
    if caching:
        assert eng.bm.prefix_hits > 0
    eng.assert_no_leaks()


def test_room_for_guesses_comes_from_what_is_left_and_goes_back():
    eng = FakeEngine(num_blocks=5, block_size=4, max_num_batched_tokens=16)
    a, b = eng.add(prompt(0, 4), max_tokens=8), eng.add(prompt(100, 7), max_tokens=4)
    eng.step()  # both prefill: a holds 1 block, b 2
    a.num_lookahead_tokens = b.num_lookahead_tokens = 8
    scheduled = eng.sched.schedule()
    # a takes its token and 7 guesses, in the two free blocks; b finds no block left for
    # guesses and runs its token alone, in its own block, preempting nobody.
    assert [(s.seq.seq_id, s.num_new_tokens, s.num_spec) for s in scheduled] == [(a.seq_id, 8, 7), (b.seq_id, 1, 0)]
    assert eng.sched.num_preemptions == 0 and eng.bm.num_free_blocks == 0
    eng.sched.update_after_step(scheduled)
    assert a.num_computed_tokens == 5  # its own token; guesses count once kept
    a.append_token(1)
    eng.sched.accept_proposed(a, 0)  # every guess rejected: the block only they used goes back
    assert a.num_computed_tokens == 5 and len(a.block_table) == 2 and eng.bm.num_free_blocks == 1
