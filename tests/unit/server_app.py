"""The server's Starlette app over fakes (FakeModel, FakeTokenizer, FakeStorage), in process.

    with app_client(tmp_path, keys=["ka:alice"]) as client:
        client.post("/v1/completions", json={...}, headers=auth("ka"))

The engine loop runs in its own thread as in ``kvpool serve``; leaving the block stops it
(idle sessions are written to ``tmp_path``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

from kvpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from kvpool.server.app import ServerState, create_app
from kvpool.server.loop import EngineLoop
from kvpool.server.metrics import ServerMetrics
from kvpool.server.params import Limits
from kvpool.server.sessions import SessionRegistry
from kvpool.server.tenants import ApiKeys
from kvpool.store import AgentCacheStore
from kvpool.testing import FakeBatchGenerator, FakeModel, FakeStorage, FakeTokenizer

SPEC = ModelCacheSpec.uniform(2, 2, 8, dtype="float32", block_tokens=4)
MODEL = "fake"


class ChatTokenizer(FakeTokenizer):
    """FakeTokenizer with a chat template: ``<role>content|`` per message, ``<assistant>``
    as the generation prompt."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return super().encode(text)

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, str]],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
    ) -> Any:
        text = "".join(f"<{m['role']}>{m['content']}|" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return self.encode(text) if tokenize else text


def make_state(
    cache: Path | AgentCacheStore,
    *,
    keys: Sequence[str] = (),
    num_blocks: int = 256,
    aliases: tuple[str, ...] = (),
    tokenizer: Any = None,
) -> ServerState:
    """A started server state over a fresh fake engine and a store on ``cache`` (a directory,
    or a store built by the caller)."""
    tokenizer = tokenizer or FakeTokenizer()
    if isinstance(cache, AgentCacheStore):
        store = cache
        engine, pool = store.engine, store.pool
        registry = SessionRegistry(store.directory)
    else:
        pool = BlockPool(SPEC, num_blocks=num_blocks, storage=FakeStorage)
        engine = BlockPoolBatchEngine(
            FakeModel(SPEC), tokenizer, pool, SPEC, batch_gen_factory=FakeBatchGenerator
        )
        registry = SessionRegistry(cache)
        store = AgentCacheStore(engine, cache, fingerprint="sha256:fake")
    metrics = ServerMetrics()
    loop = EngineLoop(engine, store, pool, registry, metrics, flush_idle_s=0.05)
    state = ServerState(
        loop=loop,
        tokenizer=tokenizer,
        model_name=MODEL,
        model_aliases=aliases,
        limits=Limits(max_context_tokens=pool.num_blocks * SPEC.block_tokens, max_tokens_cap=64),
        metrics=metrics,
        keys=ApiKeys.parse(keys),
        max_body_bytes=1 << 20,
        vocab_size=1000,
        created=int(time.time()),
        cache_dir=store.directory,
    )
    loop.start()
    return state


@contextmanager
def app_client(cache: Path | AgentCacheStore, **kwargs: Any) -> Iterator[TestClient]:
    state = make_state(cache, **kwargs)
    with TestClient(create_app(state), raise_server_exceptions=False) as client:
        client.app_state = state  # type: ignore[attr-defined]
        yield client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def complete(
    client: TestClient,
    prompt: str,
    *,
    key: str | None = None,
    session: str | None = None,
    max_tokens: int = 2,
    **extra: Any,
) -> dict[str, Any]:
    """A greedy /v1/completions request; its JSON body (raises on a non-200)."""
    headers = auth(key) if key else {}
    if session is not None:
        headers["X-Session-ID"] = session
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    r = client.post("/v1/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


def cached(response: dict[str, Any]) -> int:
    return int(response["usage"]["prompt_tokens_details"]["cached_tokens"])
