"""PrefixPins on the fakes: a pinned prefix is held for its TTL, refreshed, dropped for room,
and reused by a later request; nothing is left held once pins end."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fakes import SPEC, B, fake_engine, prompt_of, run_one
from server_app import MODEL, ChatTokenizer, app_client

from kvpool import InvalidRequestError
from kvpool.server.cache_control import usage_split
from kvpool.server.pins import PrefixPins
from kvpool.store import AgentCacheStore

FP = "sha256:fake-model"


def make_store(directory: Path, num_blocks: int = 64) -> AgentCacheStore:
    return AgentCacheStore(fake_engine(SPEC, num_blocks), directory, fingerprint=FP)


def test_a_pin_lives_for_its_ttl_and_is_refreshed(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    done = run_one(store, "a", prompt_of(13))
    assert done.blocks is not None
    pins = PrefixPins(store.pool)
    used = store.pool.num_used
    pins.pin(done.blocks, 10, 300.0, now=0.0)  # blocks 0..2 (positions 0-11)
    assert len(pins) == 1 and store.pool.num_used == used  # by reference
    (pin,) = [h for h in store.pool.manager.handles if h.agent_id.startswith("_pin")]
    assert pin.token_ids == done.blocks.token_ids[:10]
    assert pin.block_ids == done.blocks.block_ids[: -(-10 // B)]
    pins.pin(done.blocks, 10, 3600.0, now=100.0)  # the same prefix again: refreshed
    assert len(pins) == 1 and pins.num_pinned == 1
    assert pins.expire(now=3699.0) == 0
    assert pins.expire(now=3700.0) == 1 and len(pins) == 0
    store.forget("a")
    assert store.pool.num_used == 0  # nothing leaked
    store.pool.check_invariants()


def test_a_pinned_prefix_outlives_its_agent_and_is_reused(tmp_path: Path) -> None:
    store = make_store(tmp_path, num_blocks=12)
    system = prompt_of(16)  # 4 whole blocks
    done = run_one(store, "_req-1", [*system, 7, 8])
    assert done.blocks is not None
    pins = PrefixPins(store.pool)
    pins.pin(done.blocks, len(system), 300.0, now=0.0)
    store.forget("_req-1")  # the request's agent goes, as an ephemeral one does
    # other agents fill the pool: cached-free blocks are evicted, the pinned ones are not
    for i in range(3):
        run_one(store, f"o{i}", prompt_of(9, seed=10 + i), max_tokens=2)
        store.forget(f"o{i}")
    again = run_one(store, "_req-2", [*system, 9, 9])
    assert again.cached_tokens == len(system)
    pins.clear()
    store.forget("_req-2")
    assert store.pool.num_used == 0


def test_without_the_pin_the_prefix_is_evicted(tmp_path: Path) -> None:
    """Negative control for the test above: the same traffic with no pin."""
    store = make_store(tmp_path, num_blocks=12)
    system = prompt_of(16)
    run_one(store, "_req-1", [*system, 7, 8])
    store.forget("_req-1")
    for i in range(3):
        run_one(store, f"o{i}", prompt_of(9, seed=10 + i), max_tokens=2)
        store.forget(f"o{i}")
    again = run_one(store, "_req-2", [*system, 9, 9])
    assert again.cached_tokens < len(system)


def test_drop_soonest_takes_the_earliest_expiry_first(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    a = run_one(store, "a", prompt_of(12)).blocks
    b = run_one(store, "b", prompt_of(12, seed=2)).blocks
    assert a is not None and b is not None
    pins = PrefixPins(store.pool)
    pins.pin(a, 8, 3600.0, now=0.0)
    pins.pin(b, 8, 300.0, now=0.0)
    assert pins.drop_soonest() and len(pins) == 1
    (left,) = [h for h in store.pool.manager.handles if h.agent_id.startswith("_pin")]
    assert left.token_ids == a.token_ids[:8]
    assert pins.drop_soonest() and not pins.drop_soonest()
    with pytest.raises(InvalidRequestError, match=f"1..{a.total_tokens}"):
        store.pool.fork(a, "x", a.total_tokens + 1)


def test_usage_split_adds_up_as_anthropic_defines() -> None:
    # (prompt, cached, last breakpoint end) -> (input, creation, read)
    assert usage_split(400, 0, 366) == (34, 366, 0)
    assert usage_split(400, 366, 366) == (34, 0, 366)
    assert usage_split(400, 399, 366) == (34, 0, 366)  # cached past the breakpoint: input
    assert usage_split(400, 100, 366) == (34, 266, 100)
    assert usage_split(400, 120, None) == (280, 0, 120)  # no breakpoint: what was done
    for args in [(400, 0, 366), (400, 399, 366), (400, 100, 366), (50, 10, 80)]:
        assert sum(usage_split(*args)) == args[0]


# ------------------------------------------------------------------- through the server


def message(client: Any, system: Any, user: Any) -> dict[str, Any]:
    r = client.post(
        "/v1/messages",
        json={
            "model": MODEL,
            "max_tokens": 2,
            "temperature": 0,
            "system": system,
            "messages": [{"role": "user", "content": user}],
        },
    )
    assert r.status_code == 200, r.text
    return dict(r.json()["usage"])


def test_breakpoints_are_pinned_and_usage_adds_up(tmp_path: Path) -> None:
    text = "you are a librarian. " * 3
    marked = [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]
    with app_client(tmp_path, tokenizer=ChatTokenizer()) as client:
        loop = client.app_state.loop  # type: ignore[attr-defined]
        end = len(f"<system>{text}|")  # the fake template: one token per character
        first = message(client, marked, "hi")
        prompt = end + len("<user>hi|<assistant>")
        assert first == {
            "input_tokens": prompt - end,
            "output_tokens": 2,
            "cache_creation_input_tokens": end,
            "cache_read_input_tokens": 0,
        }
        assert len(loop.pins) == 1
        second = message(client, marked, "where are the maps?")
        assert second["cache_read_input_tokens"] == end
        assert second["cache_creation_input_tokens"] == 0
        assert second["input_tokens"] == len("<user>where are the maps?|<assistant>")
        assert len(loop.pins) == 1  # the same prefix: refreshed, not pinned twice
        pins = client.get("/v1/cache/stats").json()["pins"]
        assert pins == {"num_live": 1, "num_pinned": 1, "num_dropped": 0}
        # no breakpoint: what the server did (the prefix cache still read the system turn)
        plain = message(client, text, "hi")
        assert plain["cache_creation_input_tokens"] == 0
        assert plain["input_tokens"] + plain["cache_read_input_tokens"] == prompt
        bad = client.post(
            "/v1/messages",
            json={
                "model": MODEL,
                "max_tokens": 2,
                "system": [{"type": "text", "text": "x", "cache_control": {"type": "forever"}}],
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        # pins end at their TTL
        assert loop.call(lambda: loop.pins.expire(time.monotonic() + 301)).result() == 1
        assert len(loop.pins) == 0


def test_a_pin_gives_way_to_a_request_that_needs_its_blocks(tmp_path: Path) -> None:
    text = "you are a librarian. " * 2  # a 51-token system turn in the fake template
    marked = [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]
    with app_client(tmp_path, tokenizer=ChatTokenizer(), num_blocks=20) as client:
        message(client, marked, "hi")
        stats = client.get("/v1/cache/stats").json()
        assert stats["pins"]["num_live"] == 1
        assert stats["pool"]["num_used"] == -(-len(f"<system>{text}|") // B)  # the pin's
        # a request that needs more blocks than are left while the pin holds its own
        r = client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "z" * 60, "max_tokens": 8, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        assert client.get("/v1/cache/stats").json()["pins"] == {
            "num_live": 0,
            "num_pinned": 1,
            "num_dropped": 1,
        }
