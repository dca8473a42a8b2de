"""FakeRedis: the few Redis commands RedisTier uses, in memory, with failure injection.

``fail_after = n`` lets ``n`` more commands through, then every command raises
``redis.ConnectionError`` (as a killed server does) until ``fail_after = None``. A pipeline's
commands run one by one at ``execute``, so a failure can land in the middle of one (what a
server killed mid-write leaves). ``log`` records every command name and key. ``lpush``
makes a list key: ``get`` of it raises WRONGTYPE, as Redis does (``set`` replaces it).
"""

from __future__ import annotations

from typing import Any

import redis


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.lists: dict[str, list[bytes]] = {}
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

    def get(self, key: str) -> bytes | None:
        self._tick("get", key)
        if key in self.lists:
            raise redis.ResponseError(
                "WRONGTYPE Operation against a key holding the wrong kind of value"
            )
        return self.data.get(key)

    def lpush(self, key: str, value: bytes) -> int:
        self._tick("lpush", key)
        self.data.pop(key, None)
        self.lists.setdefault(key, []).insert(0, value)
        return len(self.lists[key])

    def flushall(self) -> bool:
        self._tick("flushall", "")
        self.data.clear()
        self.lists.clear()
        self.ttl.clear()
        return True

    def set(self, key: str, value: bytes, nx: bool = False, ex: int | None = None) -> bool | None:
        self._tick("set", key)
        if nx and (key in self.data or key in self.lists):
            return None
        self.lists.pop(key, None)
        self.data[key] = bytes(value)
        self.bytes_in += len(value)
        if ex is not None:
            self.ttl[key] = ex
        else:
            self.ttl.pop(key, None)
        return True

    def exists(self, key: str) -> int:
        self._tick("exists", key)
        return int(key in self.data or key in self.lists)

    def expire(self, key: str, seconds: int) -> bool:
        self._tick("expire", key)
        if key not in self.data and key not in self.lists:
            return False
        self.ttl[key] = seconds
        return True

    def delete(self, key: str) -> int:
        self._tick("delete", key)
        self.ttl.pop(key, None)
        found = self.lists.pop(key, None) is not None
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
