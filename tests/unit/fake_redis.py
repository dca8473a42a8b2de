"""FakeRedis: the few Redis commands RedisTier uses, in memory, with failure injection.

``fail_after = n`` lets ``n`` more commands through, then every command raises
``redis.ConnectionError`` (as a killed server does) until ``fail_after = None``. A pipeline's
commands run one by one at ``execute``, so a failure can land in the middle of one (what a
server killed mid-write leaves). ``log`` records every command name and key.
"""

from __future__ import annotations

from typing import Any

import redis


class FakeRedis:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
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
        return self.data.get(key)

    def set(self, key: str, value: bytes, nx: bool = False, ex: int | None = None) -> bool | None:
        self._tick("set", key)
        if nx and key in self.data:
            return None
        self.data[key] = bytes(value)
        self.bytes_in += len(value)
        if ex is not None:
            self.ttl[key] = ex
        else:
            self.ttl.pop(key, None)
        return True

    def exists(self, key: str) -> int:
        self._tick("exists", key)
        return int(key in self.data)

    def expire(self, key: str, seconds: int) -> bool:
        self._tick("expire", key)
        if key not in self.data:
            return False
        self.ttl[key] = seconds
        return True

    def delete(self, key: str) -> int:
        self._tick("delete", key)
        self.ttl.pop(key, None)
        return int(self.data.pop(key, None) is not None)

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

    def execute(self) -> list[Any]:
        calls, self.calls = self.calls, []
        return [getattr(self.client, name)(*args, **kwargs) for name, args, kwargs in calls]
