"""Prefill waves: the policy (kvpool.waves) and the engine's use of it on the fake generator."""

from __future__ import annotations

from test_engine import Harness, prompt_of

from kvpool import CompletedGeneration, TokenEvent
from kvpool.testing import FakeBatchGenerator, reference_tokens
from kvpool.waves import RATIO, SLACK, STARVE_STEPS, Candidate, Wave, compatible, next_wave

LONG, SHORT_HISTORY, SHORT_NEW = 200, 40, 8  # prompt tokens; compatible(8, 200) is False
MAX_TOKENS = 4


# -- the policy -------------------------------------------------------------------


def test_compatible_is_ratio_plus_slack_and_symmetric() -> None:
    assert compatible(1, 1 * RATIO + SLACK)
    assert not compatible(1, 1 * RATIO + SLACK + 1)
    assert compatible(100, 2 * 100 + SLACK) and compatible(2 * 100 + SLACK, 100)
    assert not compatible(64, 2048) and not compatible(2048, 64)


def test_new_wave_is_the_shortest_bucket_in_arrival_order() -> None:
    held = [Candidate(2048, 0), Candidate(64, 0), Candidate(60, 0), Candidate(1, 0)]
    # anchor 1 (shortest): members <= 2 * 1 + 64 = 66 -> 64, 60, 1; 2048 waits
    assert next_wave(held, None) == Wave((1, 2, 3), 1)
    assert next_wave([Candidate(2048, 0)], None) == Wave((0,), 2048)
    assert next_wave([], None) is None


def test_compatible_requests_join_the_wave_in_flight_others_wait() -> None:
    held = [Candidate(2048, 1), Candidate(30, 1)]
    assert next_wave(held, 64) == Wave((1,), 64)
    assert next_wave([Candidate(2048, 1)], 64) is None


def test_a_starving_request_anchors_the_next_wave_and_stops_joins() -> None:
    starving = Candidate(2048, STARVE_STEPS)
    held = [Candidate(10, 0), starving, Candidate(1500, 0)]
    assert next_wave(held, 10) is None  # nothing joins while one starves
    assert next_wave(held, None) == Wave((1, 2), 2048)  # the long bucket, not the short one


# -- the engine on the fake generator ----------------------------------------------


def _mixed(gen: FakeBatchGenerator, since: int = 0) -> list[tuple[int, list[int]]]:
    """The prefill batches (call, row lengths) whose rows may not share a batch."""
    return [
        (b.call, b.lengths)
        for b in gen.prefill_batches[since:]
        if not compatible(min(b.lengths), max(b.lengths))
    ]


class _Turn:
    """Seven agents resume with SHORT_NEW new tokens each; with ``with_long``, a new agent
    with a LONG prompt is submitted first, in the same step."""

    def __init__(self, *, with_long: bool, waves: bool = True) -> None:
        self.h = Harness(num_blocks=256, prefill_waves=waves)
        self.contexts: dict[str, list[int]] = {}
        caches = {}
        for i in range(7):
            history = prompt_of(SHORT_HISTORY, seed=i)
            first = self.h.run(f"s{i}", history, max_tokens=2)
            caches[f"s{i}"] = first.blocks
            new = prompt_of(SHORT_NEW, seed=100 + i)
            self.contexts[f"s{i}"] = [*history, *first.token_ids, *new]
        gen = self.gen
        self.base_call = gen.num_next_calls  # calls before this turn
        self.base_batch = len(gen.prefill_batches)
        self.first_call: dict[str, int] = {}  # agent -> the next() call of its first token

        def on_token(event: TokenEvent) -> None:
            self.first_call.setdefault(event.agent_id, gen.num_next_calls - self.base_call)

        if with_long:
            self.contexts["long"] = prompt_of(LONG, seed=99)
            self.h.engine.submit("long", self.contexts["long"], None, MAX_TOKENS, on_token=on_token)
        for agent, cache in caches.items():
            self.h.engine.submit(agent, self.contexts[agent], cache, MAX_TOKENS, on_token=on_token)
        self.done: list[CompletedGeneration] = self.h.engine.drain()

    @property
    def gen(self) -> FakeBatchGenerator:
        return self.h.gens[0]

    def short_first_calls(self) -> list[int]:
        return [self.first_call[f"s{i}"] for i in range(7)]

    def long_prefill_calls(self) -> list[int]:
        uid_rows = [
            b.call - self.base_call
            for b in self.gen.prefill_batches[self.base_batch :]
            if max(b.lengths) >= LONG - 1
        ]
        return uid_rows


def test_long_new_prompt_does_not_share_a_prefill_batch_with_short_resumes() -> None:
    turn = _Turn(with_long=True)
    assert _mixed(turn.gen) == []
    assert len(turn.done) == 8
    for c in turn.done:
        assert c.error is None, c.error
        assert list(c.token_ids) == reference_tokens(
            turn.h.model, turn.contexts[c.agent_id], MAX_TOKENS
        ), c.agent_id
    # The resumes' first tokens come in the same next() call as without the new agent,
    # and the long prompt is prefilled after that call.
    alone = _Turn(with_long=False)
    assert turn.short_first_calls() == alone.short_first_calls()
    (long_call,) = turn.long_prefill_calls()
    assert long_call > max(turn.short_first_calls())


def test_without_waves_the_long_prompt_is_padded_with_the_resumes() -> None:
    """Negative control: prefill_waves=False batches them as plain mlx-lm does."""
    turn = _Turn(with_long=True, waves=False)
    ((_, lengths),) = _mixed(turn.gen, turn.base_batch)
    assert sorted(lengths) == [SHORT_NEW - 1] * 7 + [LONG - 1]  # the last token is fed alone
    (long_call,) = turn.long_prefill_calls()
    assert long_call < min(turn.short_first_calls())


def test_compatible_arrival_joins_the_wave_in_flight() -> None:
    h = Harness(num_blocks=256)
    h.engine.submit("a", prompt_of(20, seed=1), max_tokens=MAX_TOKENS)
    list(h.engine.step())  # a's wave is in flight (prefilled, no first token yet)
    h.engine.submit("b", prompt_of(24, seed=2), max_tokens=MAX_TOKENS)
    h.engine.submit("long", prompt_of(LONG, seed=3), max_tokens=MAX_TOKENS)
    list(h.engine.step())
    gen = h.gens[0]
    assert gen.prefill_batches[-1].lengths == [23]  # b joined at once; the long one waits
    done = {c.agent_id: c for c in h.engine.drain()}
    assert set(done) == {"a", "b", "long"}
    assert _mixed(gen) == []


def test_a_long_request_is_not_starved_by_a_stream_of_short_ones() -> None:
    h = Harness(num_blocks=512, max_batch_size=64)
    h.engine.submit("long", prompt_of(LONG, seed=3), max_tokens=2)
    started_at = None
    for step in range(4 * STARVE_STEPS):
        h.engine.submit(f"s{step}", prompt_of(6, seed=step), max_tokens=30)
        list(h.engine.step())
        gen = h.gens[0]
        if any(max(b.lengths) >= LONG - 1 for b in gen.prefill_batches):
            started_at = step
            break
    assert started_at is not None and started_at <= STARVE_STEPS + 3, started_at
    h.engine.close()


def test_a_held_request_can_be_cancelled_and_close_releases_held_ones() -> None:
    h = Harness(num_blocks=256)
    free = h.pool.num_free
    h.engine.submit("short", prompt_of(10, seed=1), max_tokens=MAX_TOKENS)
    uid = h.engine.submit("long", prompt_of(LONG, seed=2), max_tokens=MAX_TOKENS)
    list(h.engine.step())  # "long" is held for the next wave
    assert h.engine.is_in_flight("long")
    assert h.engine.cancel(uid)
    assert not h.engine.is_in_flight("long")
    h.engine.submit("long", prompt_of(LONG, seed=2), max_tokens=MAX_TOKENS)
    list(h.engine.step())
    h.engine.close()
    assert not h.engine.has_work
    assert h.pool.num_free == free
