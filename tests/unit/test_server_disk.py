"""Each session saved on its own (issue 20, items 2 and 3): a session that cannot be written
never stops another's save, and a disk that takes nothing never fails a request."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from server_app import app_client, cached, complete

from kvpool import BlockPool, BlockPoolBatchEngine
from kvpool.cache.tables import CacheHandle
from kvpool.errors import CacheWriteError
from kvpool.persist import cache_path
from kvpool.pool import BlockPool as Pool
from kvpool.store import AgentCacheStore, Tier
from kvpool.testing import FakeBatchGenerator, FakeModel, FakeStorage, FakeTokenizer
from kvpool.tier.local import LocalTier

FP = "sha256:fake"


def make_store(directory: Path | LocalTier, num_blocks: int = 128) -> AgentCacheStore:
    from server_app import SPEC

    pool = BlockPool(SPEC, num_blocks=num_blocks, storage=FakeStorage)
    engine = BlockPoolBatchEngine(
        FakeModel(SPEC), FakeTokenizer(), pool, SPEC, batch_gen_factory=FakeBatchGenerator
    )
    return AgentCacheStore(engine, directory, fingerprint=FP)


def turn(store: AgentCacheStore, agent: str, n: int, seed: int = 1) -> None:
    store.submit(agent, [1 + (seed * 31 + i * 17) % 997 for i in range(n)], 2)
    (done,) = store.drain()
    assert done.error is None


def test_a_path_taken_by_a_directory_fails_that_session_alone(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    for seed, agent in enumerate(["x", "y", "z"]):  # x first: the first one flush meets
        turn(store, agent, 10, seed)
    cache_path(tmp_path, "x").mkdir()
    assert store.flush() == 2
    assert set(store.save_errors) == {"x"} and store.stats.num_save_errors == 1
    assert store.tier("x") is Tier.HOT  # unsaved: still hot
    report = store.close()
    assert (report.num_written, report.num_current, set(report.failed)) == (0, 2, {"x"})
    assert "directory" in report.failed["x"].lower(), report.failed
    again = make_store(tmp_path)
    assert [again.tier(a) for a in ("y", "z")] == [Tier.COLD, Tier.COLD]


_MIXED_SIZES_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_server_disk import make_store, turn
    from kvpool.persist import cache_path

    directory = Path(sys.argv[1])
    store = make_store(directory)
    turn(store, "big", 300)  # the least recently used: the first one saved
    for seed, agent in enumerate(["s1", "s2", "s3"]):
        turn(store, agent, 8, seed)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails: EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.RLIM_INFINITY))
    written = store.flush()
    out = {"flushed": written, "errors": sorted(store.save_errors)}
    report = store.close()
    out["report"] = [report.num_written, report.num_current, sorted(report.failed)]
    out["summary"] = report.summary()
    out["files"] = sorted(
        a for a in ("big", "s1", "s2", "s3") if cache_path(directory, a).exists()
    )
    print(json.dumps(out))
    """
)


def test_a_full_disk_flush_writes_every_session_that_fits(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (in a child) stands in for a disk with room for small files only."""
    result = subprocess.run(
        [sys.executable, "-c", _MIXED_SIZES_CHILD, str(tmp_path), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    out = json.loads(result.stdout)
    assert out["flushed"] == 3 and out["errors"] == ["big"], out
    assert out["report"] == [0, 3, ["big"]], out
    assert out["files"] == ["s1", "s2", "s3"], out
    assert "1 FAILED: big (" in out["summary"], out


class FullDiskTier(LocalTier):
    """A local tier on a disk with no room: every save fails as a full disk's does."""

    def save(self, pool: Pool, handle: CacheHandle) -> int:
        raise CacheWriteError(
            f"could not write {self.path(handle.agent_id)}: No space left on device"
        )


def test_a_full_disk_and_a_full_pool_never_fail_a_request(tmp_path: Path) -> None:
    """Sessions keep being served (idle ones dropped when the pool needs their room) and no
    error body names a file or another session."""
    tier = FullDiskTier(tmp_path / "cache-dir-x9", fingerprint=FP)
    store = make_store(tier, num_blocks=24)  # 96 tokens: about two sessions
    bodies = []
    with app_client(store) as client:
        for i in range(6):
            bodies.append(complete(client, f"{i} " + "session text " * 3, session=f"sess-{i}"))
            bodies.append(complete(client, f"{i} sessionless " * 2))
        again = complete(client, "5 " + "session text " * 3 + "more", session="sess-5")
        stats = client.get("/v1/cache/stats").json()["store"]
        r = client.post("/v1/sessions/sess-5/offload")  # an explicit offload: 500, kept hot
        assert r.status_code == 500
        assert "cache-dir-x9" not in r.text and r.json()["error"]["type"] == "server_error"
        assert client.get("/v1/sessions/sess-5").json()["tier"] == "hot"
    assert cached(again) > 20  # the hot session still resumes
    assert stats["num_dropped"] >= 3 and stats["num_save_errors"] >= 3, stats
    assert all(b["choices"][0]["finish_reason"] for b in bodies)  # every one a 200
