"""FakeRedis: the few Redis commands RedisTier uses, in memory, with failure injection.

``fail_after = n`` lets ``n`` more commands through, then every command raises
``redis.ConnectionError`` (as a killed server does) until ``fail_after = None``. A pipeline's
commands run one by one at ``execute``, so a failure can land in the middle of one (what a
server killed mid-write leaves). ``log`` records every command name and key. ``lpush``
makes a list key and ``sadd`` a set key: ``get`` of either raises WRONGTYPE, as Redis does,
and so do ``sadd``/``smembers`` of a key of another type (``set`` replaces any).
"""

from __future__ import annotations

from typing import Any

import redis


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.lists: dict[str, list[bytes]] = {}
        self.sets: dict[str, set[bytes]] = {}
        self.ttl: dict[str, int] = {}
        self.fail_after: int | None = None
        self.log: list[tuple[str, str]] = []
        self.bytes_in = 0  # bytes of values SET (what was sent)

    def _tick(self, name: str, key: str) -> None:
        if self.fail_after is not None:
            if self.fail_after <= 0:
                raise redis.ConnectionError("Connection refused (fake)")
            self.fail_after -= 1
        self.log.append((name, key))

    def _other_type(self, key: str, *kinds: dict[str, Any]) -> None:
        if any(key in kind for kind in kinds):
            raise redis.ResponseError(
                "WRONGTYPE Operation against a key holding the wrong kind of value"
            )

    def _has(self, key: str) -> bool:
        return key in self.data or key in self.lists or key in self.sets

    def get(self, key: str) -> bytes | None:
        self._tick("get", key)
        self._other_type(key, self.lists, self.sets)
        return self.data.get(key)

    def sadd(self, key: str, *members: object) -> int:
        self._tick("sadd", key)
        self._other_type(key, self.data, self.lists)
        found = self.sets.setdefault(key, set())
        new = {str(m).encode() if not isinstance(m, bytes) else m for m in members} - found
        found |= new
        return len(new)

    def smembers(self, key: str) -> set[bytes]:
        self._tick("smembers", key)
        self._other_type(key, self.data, self.lists)
        return set(self.sets.get(key, ()))

    def sscan(self, key: str, cursor: int = 0, count: int | None = None) -> tuple[int, list[bytes]]:
        """One page of about ``count`` members (as Redis pages a big set), sorted; the
        cursor of the next page, 0 after the last."""
        self._tick("sscan", key)
        self._other_type(key, self.data, self.lists)
        members = sorted(self.sets.get(key, ()))
        stop = len(members) if count is None else min(len(members), cursor + count)
        return (0 if stop >= len(members) else stop), members[cursor:stop]

    def lpush(self, key: str, value: bytes) -> int:
        self._tick("lpush", key)
        self.data.pop(key, None)
        self.sets.pop(key, None)
        self.lists.setdefault(key, []).insert(0, value)
        return len(self.lists[key])

    def flushall(self) -> bool:
        self._tick("flushall", "")
        self.data.clear()
        self.lists.clear()
        self.sets.clear()
        self.ttl.clear()
        return True

    def set(self, key: str, value: bytes, nx: bool = False, ex: int | None = None) -> bool | None:
        self._tick("set", key)
        if nx and self._has(key):
            return None
        self.lists.pop(key, None)
        self.sets.pop(key, None)
        self.data[key] = bytes(value)
        self.bytes_in += len(value)
        if ex is not None:
            self.ttl[key] = ex
        else:
            self.ttl.pop(key, None)
        return True

    def exists(self, key: str) -> int:
        self._tick("exists", key)
        return int(self._has(key))

    def expire(self, key: str, seconds: int) -> bool:
        self._tick("expire", key)
        if not self._has(key):
            return False
        self.ttl[key] = seconds
        return True

    def delete(self, key: str) -> int:
        self._tick("delete", key)
        self.ttl.pop(key, None)
        found = self.lists.pop(key, None) is not None or self.sets.pop(key, None) is not None
        return int(self.data.pop(key, None) is not None or found)

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)

    def close(self) -> None:
        pass


class FakePipeline:
    def __init__(self, client: FakeRedis) -> None:
        self.client = client
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def queue(*args: Any, **kwargs: Any) -> FakePipeline:
            self.calls.append((name, args, kwargs))
            return self

        return queue

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Every command's result; with ``raise_on_error`` (redis-py's default) the first
        command error (a WRONGTYPE) is raised after all ran, else it is the result."""
        calls, self.calls = self.calls, []
        out: list[Any] = []
        for name, args, kwargs in calls:
            try:
                out.append(getattr(self.client, name)(*args, **kwargs))
            except redis.ResponseError as exc:
                out.append(exc)
        errors = [r for r in out if isinstance(r, Exception)]
        if raise_on_error and errors:
            raise errors[0]
        return out
