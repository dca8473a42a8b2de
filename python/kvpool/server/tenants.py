"""Tenants of ``kvpool serve``: API keys, and what each tenant's requests are kept apart by.

Every API key maps to a tenant (``--api-key KEY:TENANT``, or a keys file); a key without a
tenant, and a server without keys, serve the *default* tenant (name ``""``), which is what
a single-key server always was. A tenant's requests get:

* its **cache salt**: prefix blocks are shared only between requests of one salt, so no
  tenant's prompt is ever a cache hit (or a faster first token) for another;
* its **session namespace**: session ``planner`` of tenant ``acme`` is agent
  ``_t-acme_planner`` of the store (the default tenant's is plain ``planner``, as before),
  so tenants never see, continue or delete each other's sessions.

A request may add vLLM's ``cache_salt`` to partition further inside its tenant::

    tenant ""     cache_salt ""   -> salt ""                (the default, unsalted)
    tenant ""     cache_salt "u1" -> salt "\\0u1"
    tenant "acme" cache_salt ""   -> salt "acme\\0"
    tenant "acme" cache_salt "u1" -> salt "acme\\0u1"

Tenant names hold no ``_`` or ``\\0``, so both maps are one-to-one.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kvpool.errors import InvalidRequestError
from kvpool.server.errors import bad_request
from kvpool.validation import MAX_AGENT_ID_LEN

__all__ = ["DEFAULT_TENANT", "ApiKeys", "Tenant", "parse_key_spec"]

MAX_TENANT_LEN = 32
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_PREFIX = "_t-"  # agent ids of named tenants' sessions: "_t-{tenant}_{session id}"


@dataclass(frozen=True, slots=True)
class Tenant:
    """One tenant: ``name`` is ``""`` (the default) or 1..32 of ``A-Z a-z 0-9 -``."""

    name: str

    def __post_init__(self) -> None:
        if self.name and not (len(self.name) <= MAX_TENANT_LEN and _TENANT.fullmatch(self.name)):
            raise InvalidRequestError(
                f"tenant name {self.name[:40]!r} must be 1..{MAX_TENANT_LEN} letters, digits "
                "or '-', starting with a letter or digit"
            )

    @property
    def max_session_id_len(self) -> int:
        """The longest session id whose agent id fits the store's limit."""
        return MAX_AGENT_ID_LEN - (len(_PREFIX) + len(self.name) + 1 if self.name else 0)

    def agent_id(self, session_id: str) -> str:
        """The store's agent id of this tenant's (already validated) ``session_id``."""
        if not self.name:
            return session_id
        if len(session_id) > self.max_session_id_len:
            raise bad_request(
                f"session id is {len(session_id)} characters long; tenant {self.name!r} "
                f"allows at most {self.max_session_id_len}",
                param="session_id",
                code="invalid_session_id",
            )
        return f"{_PREFIX}{self.name}_{session_id}"

    def session_of(self, agent_id: str) -> str | None:
        """The session id of ``agent_id`` if it is one of this tenant's sessions, else None."""
        if not self.name:
            return None if agent_id.startswith("_") else agent_id
        prefix = f"{_PREFIX}{self.name}_"
        return agent_id[len(prefix) :] if agent_id.startswith(prefix) else None

    def salt(self, cache_salt: str = "") -> str:
        """The engine's cache salt for a request of this tenant carrying ``cache_salt``."""
        if not self.name and not cache_salt:
            return ""
        return f"{self.name}\x00{cache_salt}"


DEFAULT_TENANT = Tenant("")


def parse_key_spec(spec: str) -> tuple[str, Tenant]:
    """``KEY`` (the default tenant) or ``KEY:TENANT``; raises InvalidRequestError."""
    key, sep, name = spec.strip().rpartition(":")
    if not sep:
        key, name = name, ""
    elif not name:
        raise InvalidRequestError("a tenant name after ':' is empty (expected KEY:TENANT)")
    if not key:
        raise InvalidRequestError("an API key is empty (expected KEY or KEY:TENANT)")
    if any(c.isspace() for c in key):
        raise InvalidRequestError("an API key holds whitespace (expected KEY or KEY:TENANT)")
    return key, Tenant(name)


class ApiKeys:
    """API key -> tenant. No keys: every request is the default tenant's, unauthenticated.

    Keys are compared in constant time, every key every time, so a response's timing does
    not tell which key (or how much of one) a guess matched.
    """

    def __init__(self, key_to_tenant: dict[str, Tenant] | None = None) -> None:
        self._keys = [(k.encode(), t) for k, t in (key_to_tenant or {}).items()]

    @classmethod
    def parse(
        cls, specs: Iterable[str], keys_file: Path | None = None, whole: Iterable[str] = ()
    ) -> ApiKeys:
        """From ``KEY[:TENANT]`` strings (split at the last ``:``), a file of one such line
        each (``#`` comments) and ``whole`` keys of the default tenant, taken as they are
        (``$KVPOOL_API_KEY``, which may hold a ``:``; empty ones are skipped).

        A key given twice for different tenants is refused."""
        lines = [(s, "--api-key") for s in specs]
        if keys_file is not None:
            try:
                text = keys_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidRequestError(f"--api-keys-file {str(keys_file)!r}: {exc}") from exc
            for number, line in enumerate(text.splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if line:
                    lines.append((line, f"{keys_file.name} line {number}"))
        out: dict[str, Tenant] = {k: DEFAULT_TENANT for k in whole if k}
        for spec, where in lines:
            try:
                key, tenant = parse_key_spec(spec)
            except InvalidRequestError as exc:
                raise InvalidRequestError(f"{where}: {exc}") from None
            if out.get(key, tenant) != tenant:
                raise InvalidRequestError(
                    f"{where}: one key is given for tenants {out[key].name!r} and {tenant.name!r}"
                )
            out[key] = tenant
        return cls(out)

    @property
    def required(self) -> bool:
        return bool(self._keys)

    @property
    def tenants(self) -> list[Tenant]:
        return sorted({t for _, t in self._keys}, key=lambda t: t.name)

    def tenant_of(self, given: str | None) -> Tenant | None:
        """The tenant of key ``given``; None if keys are required and it is none of them."""
        if not self._keys:
            return DEFAULT_TENANT
        found = None
        raw = (given or "").encode()
        for key, tenant in self._keys:
            if hmac.compare_digest(raw, key) and given is not None:
                found = tenant
        return found
