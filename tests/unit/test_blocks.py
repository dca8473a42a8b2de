from __future__ import annotations

import pytest

from kvpool import CacheHandle, CompletedGeneration, GroupTable, InvalidRequestError
from kvpool.cache import NULL_BLOCK
from kvpool.validation import validate_agent_id, validate_count, validate_token_ids


def test_cache_handle_tables_and_token_counts() -> None:
    # block_tokens 4, 10 tokens:  t0..t3 | t4..t7 | t8 t9   -> blocks [12, 3, 40]
    handle = CacheHandle("a", tuple(range(10)), (GroupTable((12, 3, 40)),), 4, "", 1)
    assert handle.total_tokens == 10 and handle.block_ids == (12, 3, 40)
    assert handle.num_blocks == 3
    sliding = GroupTable((NULL_BLOCK, 3, 40), valid_from=5)
    assert sliding.held == (3, 40)
    assert CacheHandle("a", tuple(range(10)), (sliding,), 4, "", 1).num_blocks == 2


@pytest.mark.parametrize("block_ids", [(1, 2), (1, 2, 3, 4)])
def test_cache_handle_invariants(block_ids: tuple[int, ...]) -> None:
    with pytest.raises(InvalidRequestError, match="need 3 blocks"):
        CacheHandle("a", tuple(range(10)), (GroupTable(block_ids),), 4, "", 1)


def test_cache_handles_compare_by_identity() -> None:
    def make() -> CacheHandle:
        return CacheHandle("a", (1,), (GroupTable((0,)),), 4, "", 1)

    a = make()
    assert a == a and a != make()


def test_completed_generation_rates() -> None:
    done = CompletedGeneration(
        uid=0,
        agent_id="a",
        text="x",
        token_ids=(1, 2, 3),
        blocks=None,
        finish_reason="length",
        prompt_tokens=10,
        cached_tokens=4,
        ttft_s=0.5,
        elapsed_s=1.5,
    )
    assert done.token_count == 3
    assert done.prefilled_tokens == 6
    assert done.decode_tokens_per_s == pytest.approx(2.0)


@pytest.mark.parametrize("agent_id", ["a", "agent-1", "A.b_c", "x" * 128])
def test_valid_agent_ids(agent_id: str) -> None:
    assert validate_agent_id(agent_id) == agent_id


@pytest.mark.parametrize(
    "agent_id", ["", "..", ".hidden", "-x", "a/b", "a\\b", "a\x00b", "x" * 129, "é", 3, None]
)
def test_invalid_agent_ids(agent_id: object) -> None:
    with pytest.raises(InvalidRequestError):
        validate_agent_id(agent_id)


def test_token_and_count_validation() -> None:
    assert validate_token_ids([1, 2], 10) == [1, 2]
    for bad in ([], [1, -1], [1, 10], [1, 2.0], [True]):
        with pytest.raises(InvalidRequestError):
            validate_token_ids(bad, 10)
    assert validate_count("n", 1) == 1
    for bad_count in (0, -1, 1.5, True, "3"):
        with pytest.raises(InvalidRequestError):
            validate_count("n", bad_count)
