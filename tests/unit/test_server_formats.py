"""Block formats on one cache directory (issue 20, item 8): each format keeps its own."""

from __future__ import annotations

from pathlib import Path

from kvpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from kvpool.persist import cache_path, save_cache
from kvpool.server.serve import adopt_files, format_dir, other_formats
from kvpool.testing import FakeBatchGenerator, FakeModel, FakeStorage, FakeTokenizer

DENSE = ModelCacheSpec.uniform(2, 2, 64, dtype="float16", block_tokens=4)
Q4 = DENSE.with_format(4)
FP = "sha256:fake"


def write_session(directory: Path, spec: ModelCacheSpec, agent: str) -> Path:
    pool = BlockPool(spec, num_blocks=16, storage=FakeStorage)
    engine = BlockPoolBatchEngine(
        FakeModel(spec), FakeTokenizer(), pool, spec, batch_gen_factory=FakeBatchGenerator
    )
    engine.submit(agent, [5, 6, 7, 8, 9], None, 2)
    (done,) = engine.drain()
    assert done.blocks is not None
    path = cache_path(directory, agent)
    save_cache(path, pool, done.blocks, fingerprint=FP)
    return path


def test_formats_keep_their_own_directories_and_old_4bit_files_are_adopted(
    tmp_path: Path,
) -> None:
    assert format_dir(tmp_path, DENSE) == tmp_path  # dense: where it always was
    q4_dir = format_dir(tmp_path, Q4)
    assert q4_dir == tmp_path / "q4g64-float16"
    write_session(tmp_path, DENSE, "dense-1")
    old_q4 = write_session(tmp_path, Q4, "quant-1")  # what an older kvpool wrote: flat
    q4_dir.mkdir()
    assert adopt_files(tmp_path, q4_dir, Q4) == 1
    assert not old_q4.exists() and (q4_dir / old_q4.name).is_file()
    assert cache_path(tmp_path, "dense-1").is_file()  # another format's file stays
    assert adopt_files(tmp_path, tmp_path, DENSE) == 0
    assert other_formats(tmp_path, q4_dir) == {".": 1}
    assert other_formats(tmp_path, tmp_path) == {"q4g64-float16": 1}
