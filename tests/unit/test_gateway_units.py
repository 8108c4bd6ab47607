"""The gateway's pure logic: tenants, settings, the relay's stream watching. The routing
store's atomic steps run against both implementations in tests/integration/test_routing_store.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from starlette.requests import Request

from hosting.gateway.event_stream import StreamWatcher, lost_stream, next_event_id
from hosting.gateway.pool_demand import PoolSizing
from hosting.gateway.settings import GatewaySettings, shared_sandbox_memory_bytes
from hosting.gateway.tenants import TokenAuthenticator, load_tenant_tokens
from hosting.sandboxes.base import SandboxSpec
from hosting.server.box import Box
from hosting.settings_env import ConfigError

BASE_ENV = {"GATEWAY_TENANTS": "tok-a:alice", "ANTHROPIC_API_KEY": "sk-x"}


def request_with(authorization: str | None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return Request({"type": "http", "headers": headers, "method": "GET", "path": "/"})


def test_tokens_inline_and_from_a_file_of_digests(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"tok-bob").hexdigest()
    tenants_file = tmp_path / "tenants"
    tenants_file.write_text(f"# tenants\nbob sha256:{digest}\n\n")
    auth = TokenAuthenticator(load_tenant_tokens("tok-a:alice, tok:with:colons:carol", str(tenants_file)))
    assert auth.authenticate(request_with("Bearer tok-a")) == "alice"
    assert auth.authenticate(request_with("bearer tok-bob")) == "bob"
    assert auth.authenticate(request_with("Bearer tok:with:colons")) == "carol"
    for refused in (None, "", "Bearer", "Bearer wrong", "Basic tok-a", "tok-a"):
        assert auth.authenticate(request_with(refused)) is None


@pytest.mark.parametrize("inline, line, fragment", [
    ("secret-token", "", "GATEWAY_TENANTS entry 1 is not token:tenant"),
    ("secret-token:bad name", "", "tenant names are"),
    ("", "alice sha256:abc", "line 1: expected"),
    ("", "alice secret-token", "line 1: expected"),
])
def test_bad_tenant_configuration_names_the_place_never_the_token(tmp_path: Path, inline: str, line: str,
                                                                  fragment: str) -> None:
    path = tmp_path / "tenants"
    path.write_text(line)
    with pytest.raises(ConfigError) as raised:
        load_tenant_tokens(inline, str(path) if line else None)
    assert fragment in str(raised.value)
    assert "secret-token" not in str(raised.value)


def test_settings_fail_closed_without_tenants() -> None:
    with pytest.raises(ConfigError, match="no tenant configured"):
        GatewaySettings.from_env({"ANTHROPIC_API_KEY": "sk-x"})


def test_settings_need_model_credentials_for_the_sandboxes() -> None:
    with pytest.raises(ConfigError, match="No model credentials"):
        GatewaySettings.from_env({"GATEWAY_TENANTS": "t:alice"})


@pytest.mark.parametrize("name, value", [("GATEWAY_BACKEND", "k8s"), ("GATEWAY_WARM_POOL", "-1"),
                                         ("GATEWAY_WARM_POOL_MAX", "-1"), ("GATEWAY_POOL_START_CONCURRENCY", "0"),
                                         ("GATEWAY_REDIS_URL", "http://x"), ("GATEWAY_INSTALLATION", "Bad_Name"),
                                         ("GATEWAY_DOCKER_NETWORK", "none"), ("PORT", "0"),
                                         ("GATEWAY_SANDBOX_SCOPE", "user"), ("GATEWAY_SESSIONS_PER_SANDBOX", "0")])
def test_settings_reject_bad_values_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        GatewaySettings.from_env({**BASE_ENV, name: value})


def test_the_sandbox_scope_and_what_a_shared_sandbox_is_sized_for() -> None:
    default = GatewaySettings.from_env(BASE_ENV)
    assert (default.sandbox_scope, default.sessions_per_sandbox) == ("session", 8)
    assert default.sandboxes.sandbox_memory_bytes == 2**30
    tenant = GatewaySettings.from_env({**BASE_ENV, "GATEWAY_SANDBOX_SCOPE": "tenant"})
    assert tenant.sandbox_scope == "tenant" and tenant.sandboxes.sandbox_memory_bytes == shared_sandbox_memory_bytes(8)
    chosen = GatewaySettings.from_env({**BASE_ENV, "GATEWAY_SANDBOX_SCOPE": "tenant",
                                       "GATEWAY_SESSIONS_PER_SANDBOX": "3", "GATEWAY_SANDBOX_MEMORY_BYTES": "999999999"})
    assert chosen.sessions_per_sandbox == 3 and chosen.sandboxes.sandbox_memory_bytes == 999999999
    for sessions in (1, 2, 8, 20):  # the server's own sizing keeps every session's CLI warm beside two pre-started
        fit = Box(machine_memory=2**40, cpus=2, memory_limit=shared_sandbox_memory_bytes(sessions)).fit()
        assert fit.clis >= sessions + 2 and fit.warm_sessions(2) >= sessions


def test_a_sandbox_of_one_session_keeps_one_cli_and_a_shared_one_as_many_as_fit() -> None:
    def cli_env(**spec: object) -> dict[str, str]:
        env = SandboxSpec("sbx-1", "vol-1", "tk", **spec).server_env(host="h", port=1, data_dir="d")
        return {k: v for k, v in env.items() if k in ("AGENT_PREWARM", "AGENT_WARM_SESSIONS", "AGENT_SESSION_CAPACITY")}

    assert cli_env() == {"AGENT_PREWARM": "1", "AGENT_WARM_SESSIONS": "1", "AGENT_SESSION_CAPACITY": "1"}
    assert cli_env(session_capacity=8) == {"AGENT_PREWARM": "2", "AGENT_SESSION_CAPACITY": "8"}
    assert cli_env(prewarm=False, session_capacity=None) == {"AGENT_PREWARM": "0", "AGENT_WARM_SESSIONS": "0"}


def test_sandboxes_inherit_only_the_allowlist() -> None:
    settings = GatewaySettings.from_env({**BASE_ENV, "MODEL": "m", "GATEWAY_ADMIN_TOKEN": "admin-secret",
                                         "AWS_SECRET_ACCESS_KEY": "aws", "GATEWAY_SANDBOX_ENV": "HTTPS_PROXY",
                                         "HTTPS_PROXY": "http://proxy"})
    assert dict(settings.sandbox_env) == {"ANTHROPIC_API_KEY": "sk-x", "MODEL": "m", "HTTPS_PROXY": "http://proxy",
                                          "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    assert "admin-secret" not in repr(settings) and "sk-x" not in repr(settings)
    assert settings.port == 8080 and settings.sandboxes.backend == "local"
    assert settings.idle_timeout_seconds == 900


@pytest.mark.parametrize("env, sizing", [
    ({}, PoolSizing(floor=2, ceiling=10, start_concurrency=2)),
    ({"GATEWAY_WARM_POOL": "4", "GATEWAY_WARM_POOL_MAX": "4", "GATEWAY_POOL_START_CONCURRENCY": "3"}, PoolSizing(4, 4, 3)),
    ({"GATEWAY_WARM_POOL": "20"}, PoolSizing(20, 20, 2)),
    ({"GATEWAY_WARM_POOL": "0"}, PoolSizing(0, 0, 2)),
    ({"GATEWAY_WARM_POOL": "0", "GATEWAY_WARM_POOL_MAX": "5"}, PoolSizing(0, 5, 2)),
], ids=["defaults", "fixed", "floor-above-the-default-max", "off", "from-zero"])
def test_the_warm_pool_grows_from_its_floor_to_its_max(env: dict[str, str], sizing: PoolSizing) -> None:
    assert GatewaySettings.from_env({**BASE_ENV, **env}).warm_pool == sizing


def test_a_max_below_the_floor_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"GATEWAY_WARM_POOL_MAX \(1\) must be at least GATEWAY_WARM_POOL \(2\)"):
        GatewaySettings.from_env({**BASE_ENV, "GATEWAY_WARM_POOL_MAX": "1"})


def test_event_ids_continue_either_numbering() -> None:
    assert [next_event_id(None), next_event_id("1764-9"), next_event_id("abc")] == ["0-1", "1764-10", "abc-1"]


def test_the_watcher_follows_lines_split_across_chunks() -> None:
    watcher = StreamWatcher()
    stream = b'event: text\r\nid: 4\r\ndata: {"v": 1}\r\n\r\n: ping\r\n\r\nevent: do'
    for i in range(0, len(stream), 5):
        watcher.feed(stream[i:i + 5])
    assert watcher.last_id == "4" and not watcher.done
    watcher.feed(b"ne\r\nid: 5\r\n")
    assert watcher.last_id == "5" and not watcher.done, "done is whole only at its blank line"
    watcher.feed(b'data: {"v": 1}\r\n\r')
    assert not watcher.done
    watcher.feed(b"\n")
    assert watcher.done


def test_the_watcher_relays_whole_events_only_whatever_the_chunks() -> None:
    whole = b'event: text\r\nid: 4\r\ndata: {"v": 1}\r\n\r\n: ping\n\nevent: text\nid: 5\ndata: {"v": 2}\n\n'
    cut_short = b'event: text\r\nid: 6\r\ndata: {"v": 3, "te'
    for size in (1, 2, 5, 7, len(whole) + len(cut_short)):
        watcher, relayed = StreamWatcher(), []
        stream = whole + cut_short
        for i in range(0, len(stream), size):
            relayed.append(watcher.feed(stream[i:i + size]))
            assert all(part.endswith((b"\n\n", b"\n\r\n")) for part in relayed if part), "whole events only"
        assert b"".join(relayed) == whole and watcher.unfinished == len(cut_short)
        watcher.drop_unfinished()
        assert watcher.feed(lost_stream(watcher.last_id, "gone")) == lost_stream("6", "gone")


def test_the_watcher_hands_each_whole_event_to_its_observer() -> None:
    seen: list[tuple[str, bytes]] = []
    watcher = StreamWatcher(lambda kind, data: seen.append((kind, data)))
    stream = (b'event: session\r\nid: 7-1\r\ndata: {"v": 1}\r\n\r\n: ping\r\n\r\n'
              b'event: result\r\nid: 7-2\r\ndata: {"v": 1, "total_cost_usd": 0.5}\r\n\r\nevent: done\r\nid: 7-3\r\n'
              b'data: {"v": 1}\r\n\r\n')
    for i in range(0, len(stream), 7):
        watcher.feed(stream[i:i + 7])
    assert seen == [("session", b'{"v": 1}'), ("result", b'{"v": 1, "total_cost_usd": 0.5}'), ("done", b'{"v": 1}')]
    assert watcher.last_id == "7-3" and watcher.done


def test_a_lost_stream_ends_with_error_then_done() -> None:
    events = [block for block in lost_stream("5-12", "gone").decode().split("\r\n\r\n") if block]
    parsed = [dict(line.split(": ", 1) for line in block.split("\r\n")) for block in events]
    assert [(e["event"], e["id"]) for e in parsed] == [("error", "5-13"), ("done", "5-14")]
    assert json.loads(parsed[0]["data"]) == {"v": 1, "code": "sandbox_lost", "message": "gone", "retryable": True}
