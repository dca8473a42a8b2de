"""The real peer: mlx-lm's own prompt cache, driven the way ``mlx_lm.server`` drives it.

A user who does not run kvpool runs ``mlx_lm.server``, which keeps finished caches in mlx-lm's
``LRUPromptCache`` (a token trie with an LRU) and resumes from them. :class:`LruPromptCacheWay`
does per turn what the server's batched generation loop does per request, with mlx-lm's own
classes (``LRUPromptCache``, ``BatchGenerator``) and no HTTP:

1. ``fetch_nearest_cache(prompt)``: a deep copy of the cache of the longest cached prefix (or
   of a longer cached sequence, trimmed to the common prefix), and the tokens not in it;
2. split the prompt into the server's segments, ``[system prompt, rest]`` when the request
   has a system prompt (``TurnRequest.system_tokens``), minus the cached tokens, and
   ``BatchGenerator.insert_segments`` them with that cache;
3. at every end of a segment that is not the end of the prompt, ``extract_cache`` and
   ``insert_cache`` it (typed ``system``, then ``user``): how the server shares a system
   prompt between conversations;
4. when the sequence finishes, ``insert_cache(all_tokens, prompt_cache)`` (``assistant``).

Timed by the same clock as :func:`kvpool.benchmarks.turns.run_kvpool_turn`: ``t0`` just
before the first fetch, TTFT when an agent's first token comes out of ``next()``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from kvpool.benchmarks.turns import TurnRequest, TurnResult, plain_generator
from kvpool.errors import GenerationError
from kvpool.pool import BlockPool

MODEL_KEY = "bench-model"  # the server keys its trie by model; one model here
DEFAULT_MAX_SIZE = 10  # mlx_lm.server --prompt-cache-size default


def lru_size_for(num_agents: int) -> int:
    """An LRU that holds every agent (and a system prompt): the peer at its best. The
    server's default (10 sequences) would evict agents past 9 and re-prefill them."""
    return max(DEFAULT_MAX_SIZE, num_agents + 1)


def _segments(prompt: list[int], system_tokens: int) -> tuple[list[list[int]], list[str]]:
    """The server's segments of a chat prompt: the system prompt, then the rest."""
    if 0 < system_tokens < len(prompt):
        return [prompt[:system_tokens], prompt[system_tokens:]], ["system", "user"]
    return [prompt], ["assistant"]


def _drop_cached(segments: list[list[int]], types: list[str], num_cached: int) -> None:
    """Remove the first ``num_cached`` tokens from ``segments`` (and the types of the
    segments that go entirely), as the server does after ``fetch_nearest_cache``."""
    n = num_cached
    while n > 0:
        if n >= len(segments[0]):
            n -= len(segments.pop(0))
            types.pop(0)
        else:
            segments[0] = segments[0][n:]
            break


class LruPromptCacheWay:
    """One ``BatchGenerator`` and one ``LRUPromptCache`` serving turns as the server does."""

    def __init__(self, model: Any, tokenizer: Any, max_size: int = DEFAULT_MAX_SIZE) -> None:
        from kvpool.mlx.mlx_lm import lru_prompt_cache

        self.max_size = max_size
        self.generator = plain_generator(model, tokenizer)
        self.cache = lru_prompt_cache(max_size)

    def hold(self, tokens: Sequence[int], caches: Sequence[Any]) -> None:
        """Put a finished conversation's per-layer caches in the prompt cache."""
        self.cache.insert_cache(MODEL_KEY, list(tokens), list(caches), cache_type="assistant")

    def forget(self) -> None:
        """Drop everything the prompt cache holds (a fresh ``LRUPromptCache``)."""
        from kvpool.mlx.mlx_lm import lru_prompt_cache

        self.cache = lru_prompt_cache(self.max_size)

    @property
    def num_held(self) -> int:
        return len(self.cache)

    def run_turn(self, requests: Sequence[TurnRequest]) -> TurnResult:
        """Serve every request (submitted together); step until all finish."""
        start = time.perf_counter()
        uid_to_agent: dict[int, str] = {}
        uid_to_types: dict[int, list[str]] = {}
        cached: dict[str, int] = {}
        parts = {"cache_in": 0.0, "generate": 0.0, "cache_out": 0.0}
        for r in requests:
            prompt = list(r.prompt)
            t0 = time.perf_counter()
            # the deep copy is lazy, as the server leaves it: its device copy runs in the
            # first BatchGenerator.next, so it counts in "generate", not here
            cache, rest = self.cache.fetch_nearest_cache(MODEL_KEY, prompt)
            parts["cache_in"] += time.perf_counter() - t0
            num_cached = len(prompt) - len(rest)
            segments, types = _segments(prompt, r.system_tokens)
            _drop_cached(segments, types, num_cached)
            (uid,) = self.generator.insert_segments(
                segments=[segments],
                max_tokens=[r.max_tokens],
                caches=[cache],
                all_tokens=[prompt[:num_cached]],
            )
            del cache
            uid_to_agent[int(uid)] = r.agent_id
            uid_to_types[int(uid)] = types[::-1]
            cached[r.agent_id] = num_cached
        first: dict[str, float] = {}
        tokens: dict[str, list[int]] = {r.agent_id: [] for r in requests}
        running = set(uid_to_agent)
        while running:
            t0 = time.perf_counter()
            prompt_responses, responses = self.generator.next()
            now = time.perf_counter()
            parts["generate"] += now - t0
            ends = [
                int(p.uid)
                for p in prompt_responses
                if p.end_of_segment and not p.end_of_prompt and uid_to_types.get(int(p.uid))
            ]
            if ends:
                for uid, (caches, key) in self.generator.extract_cache(ends).items():
                    kind = uid_to_types[int(uid)].pop()
                    self.cache.insert_cache(MODEL_KEY, key[:], caches, cache_type=kind)
                parts["cache_out"] += time.perf_counter() - now
            for response in responses:
                uid = int(response.uid)
                agent = uid_to_agent.get(uid)
                if agent is None:
                    continue
                first.setdefault(agent, now)
                tokens[agent].append(int(response.token))
                if response.finish_reason is not None:
                    t0 = time.perf_counter()
                    self.cache.insert_cache(
                        MODEL_KEY,
                        response.all_tokens[:],
                        response.prompt_cache,
                        cache_type="assistant",
                    )
                    parts["cache_out"] += time.perf_counter() - t0
                    running.discard(uid)
        total = time.perf_counter() - start
        if len(first) != len(requests):
            raise GenerationError(f"{len(requests) - len(first)} sequences generated no token")
        return TurnResult(
            total_s=total,
            ttft_s={a: t - start for a, t in first.items()},
            tokens={a: tuple(t) for a, t in tokens.items()},
            completions={},
            cached_tokens=cached,
            parts_s=parts,
        )

    def close(self) -> None:
        self.generator.close()


def caches_from_pool(pool: BlockPool, handle: Any) -> list[Any]:
    """A live pool handle's cache as mlx-lm per-layer caches (``KVCache``,
    ``RotatingKVCache``, ``ArraysCache``): what the peer would hold for the same
    conversation."""
    from kvpool.persist import prompt_cache_layers

    return prompt_cache_layers(pool, handle)
