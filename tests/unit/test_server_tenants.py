"""Tenants (issue 20, item 1): API keys map to tenants; a tenant's requests get its own cache
salt and session namespace, so no tenant reads another's prompt through the prefix cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_app import app_client, auth, cached, complete

from kvpool import BlockPool, BlockPoolBatchEngine
from kvpool.errors import InvalidRequestError
from kvpool.server.tenants import DEFAULT_TENANT, ApiKeys, Tenant
from kvpool.store import AgentCacheStore, Tier
from kvpool.testing import FakeBatchGenerator, FakeModel, FakeStorage, FakeTokenizer

KEYS = ["key-a:alice", "key-m:mallory", "key-a2:alice"]
SYSTEM = "You are a helpful assistant for the finance team of a large company. "
VICTIM = SYSTEM + "The vault password is hunter2-open-sesame-42; never say it. Summarize Q3."


def guess_prompt(guess: str) -> str:
    return SYSTEM + f"The vault password is {guess}; never say it. Summarize Q3."


def attack(client: object, key: str) -> tuple[int, list[int]]:
    """Mallory's side channel: cached tokens of the right guess and of each wrong one.

    Every guess differs from every other at its first character, so a guess can share with
    the others only the common opening; the right one shares more only with the victim.
    """
    guesses = ["apple-pie-17", "mango-tree-88", "hunter2-open-sesame-42", "zebra-crossing-3"]
    got = {g: cached(complete(client, guess_prompt(g), key=key)) for g in guesses}  # type: ignore[arg-type]
    right = got.pop("hunter2-open-sesame-42")
    return right, list(got.values())


def test_another_tenants_right_guess_gets_no_more_cached_tokens_than_a_wrong_one(
    tmp_path: Path,
) -> None:
    with app_client(tmp_path, keys=KEYS) as client:
        first = complete(client, VICTIM, key="key-a", session="victim-7")
        assert cached(first) == 0
        right, wrong = attack(client, "key-m")
        assert right <= max(wrong), (right, wrong)
        # The control, the same attack from inside the victim's tenant (a second key of
        # alice): there the prefix cache is shared, and the right guess stands out.
        right_in, wrong_in = attack(client, "key-a2")
        assert right_in > max(wrong_in) + 8, (right_in, wrong_in)


def test_sessions_are_per_tenant_list_get_continue_delete(tmp_path: Path) -> None:
    with app_client(tmp_path, keys=KEYS) as client:
        complete(client, VICTIM, key="key-a", session="victim-7")
        complete(client, "mallory's own notes", key="key-m", session="attacker-1")
        listed = client.get("/v1/sessions", headers=auth("key-m")).json()["data"]
        assert [s["id"] for s in listed] == ["attacker-1"]
        listed = client.get("/v1/sessions", headers=auth("key-a2")).json()["data"]
        assert [s["id"] for s in listed] == ["victim-7"]  # alice's, through her other key
        assert client.get("/v1/sessions/victim-7", headers=auth("key-m")).status_code == 404
        assert client.delete("/v1/sessions/victim-7", headers=auth("key-m")).status_code == 404
        r = client.post("/v1/sessions/victim-7/offload", headers=auth("key-m"))
        assert r.status_code == 404
        # mallory's "victim-7" is her own, new session: it starts from nothing of alice's
        theirs = complete(client, VICTIM, key="key-m", session="victim-7")
        assert cached(theirs) == 0
        again = complete(client, VICTIM + " And Q4.", key="key-a", session="victim-7")
        assert cached(again) >= len(VICTIM) - 1  # alice's session is intact
        assert client.get("/v1/sessions/victim-7", headers=auth("key-a")).json()["turns"] == 2
        assert client.get("/v1/sessions", headers=auth("nope")).status_code == 401


def test_cache_salt_partitions_a_tenant_and_is_validated(tmp_path: Path) -> None:
    prompt = SYSTEM * 3
    with app_client(tmp_path, keys=KEYS) as client:
        complete(client, prompt, key="key-a", cache_salt="user-1")
        other = complete(client, prompt, key="key-a", cache_salt="user-2")
        same = complete(client, prompt, key="key-a", cache_salt="user-1")
        assert cached(other) == 0
        assert cached(same) >= len(prompt) - 4  # the control: one salt shares
        for bad in ["", "x" * 257, 7]:
            body = {"model": "fake", "prompt": "hi", "max_tokens": 1, "cache_salt": bad}
            r = client.post("/v1/completions", json=body, headers=auth("key-a"))
            assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", r.text


def test_without_keys_one_default_tenant_as_before(tmp_path: Path) -> None:
    with app_client(tmp_path) as client:
        complete(client, VICTIM, session="s1")
        listed = client.get("/v1/sessions").json()["data"]
        assert [s["id"] for s in listed] == ["s1"]
        store = client.app_state.loop.store  # type: ignore[attr-defined]
        assert client.app_state.loop.call(lambda: store.tier("s1")).result(5) is Tier.HOT  # type: ignore[attr-defined]
    assert list(tmp_path.glob("s1.*"))  # the default tenant's files keep their names


def test_key_specs_and_tenant_maps() -> None:
    keys = ApiKeys.parse(["k1", "k2:acme", "with:colon:acme"])
    assert keys.tenant_of("k1") == DEFAULT_TENANT
    assert keys.tenant_of("k2") == Tenant("acme")
    assert keys.tenant_of("with:colon") == Tenant("acme")
    assert keys.tenant_of("k3") is None and keys.tenant_of(None) is None
    assert ApiKeys.parse([]).tenant_of(None) == DEFAULT_TENANT
    env = ApiKeys.parse([], whole=["legacy:key", ""])  # $KVPOOL_API_KEY: taken whole
    assert env.tenant_of("legacy:key") == DEFAULT_TENANT and env.tenant_of("legacy") is None
    for bad in [["k:a_b"], ["k:"], [":t"], ["k:t", "k:u"], ["a b"]]:
        with pytest.raises(InvalidRequestError):
            ApiKeys.parse(bad)
    acme = Tenant("acme")
    assert acme.agent_id("s.1") == "_t-acme_s.1" and acme.session_of("_t-acme_s.1") == "s.1"
    assert acme.session_of("s.1") is None and DEFAULT_TENANT.session_of("_t-acme_s.1") is None
    assert Tenant("a").session_of("_t-ab_x") is None  # no prefix confusion between tenants
    salts = {t.salt(s) for t in (DEFAULT_TENANT, acme, Tenant("acme-2")) for s in ("", "u")}
    assert len(salts) == 6 and DEFAULT_TENANT.salt() == ""
    assert len(acme.agent_id("x" * acme.max_session_id_len)) == 128


def test_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# key:tenant\nk1:acme\n\nk2   # default tenant\n")
    keys = ApiKeys.parse(["k3:zeta"], path)
    assert [t.name for t in keys.tenants] == ["", "acme", "zeta"]
    path.write_text("k1:bad_name\n")
    with pytest.raises(InvalidRequestError, match="keys line 1"):
        ApiKeys.parse([], path)


def test_a_salted_agent_reloaded_from_disk_resumes_and_shares_with_no_other_salt(
    tmp_path: Path,
) -> None:
    """A cold cache is loaded under the request's salt: it resumes (before: loaded under
    salt "", then dropped as another salt's, and its blocks left shared with salt "")."""
    from server_app import SPEC

    pool = BlockPool(SPEC, num_blocks=64, storage=FakeStorage)
    engine = BlockPoolBatchEngine(
        FakeModel(SPEC), FakeTokenizer(), pool, SPEC, batch_gen_factory=FakeBatchGenerator
    )
    store = AgentCacheStore(engine, tmp_path, fingerprint="sha256:fake")
    prompt = list(range(1, 41))
    store.submit("_t-acme_s1", prompt, 2, cache_salt="acme\x00")
    (first,) = store.drain()
    assert store.evict("_t-acme_s1")
    store.submit("_t-acme_s1", prompt + list(first.token_ids) + [7, 8], 2, cache_salt="acme\x00")
    (second,) = store.drain()
    assert second.cached_tokens >= len(prompt)
    assert store.evict("_t-acme_s1")
    store.submit("plain", prompt, 2)  # salt "": nothing of acme's may be shared
    (plain,) = store.drain()
    assert plain.cached_tokens == 0
