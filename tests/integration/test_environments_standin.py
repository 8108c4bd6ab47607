"""The environment API stand-in keeps the service's semantics for the calls it serves,
driven here by the real ``anthropic`` SDK (its own request shapes and error classes):
an empty poll is ``None``, an unacknowledged item comes back after ``reclaim_older_than_ms``,
a second ack is 409, a heartbeat that does not name the last one is 412 with the lease,
stopping a stopped item is 409, a sessions token reaches only its own item, and a call it
does not implement is 501 and recorded (so the fixture fails the test that made it)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import pytest
from anthropic import Anthropic, ConflictError, InternalServerError, PermissionDeniedError, PreconditionFailedError

from tests.standins.environments import EnvironmentStandIn
from tests.standins.environments.service import serve

KEY = "envkey-standin-semantics"


@pytest.fixture
def standin() -> Iterator[EnvironmentStandIn]:
    yield from serve(EnvironmentStandIn(environment_key=KEY))


def client(standin: EnvironmentStandIn, token: str = KEY) -> Anthropic:
    return Anthropic(auth_token=token, base_url=standin.base_url, max_retries=0)


def sessions_token(secret: str) -> str:
    padded = secret + "=" * (-len(secret) % 4)
    return str(json.loads(base64.urlsafe_b64decode(padded))["sessions_token"])


def test_poll_ack_reclaim_and_a_second_ack(standin: EnvironmentStandIn) -> None:
    api, env = client(standin).beta.environments.work, standin.environment_id
    started = time.monotonic()
    assert api.poll(env, block_ms=300) is None
    assert time.monotonic() - started >= 0.3  # held open for block_ms, then JSON null

    session = standin.create_session([("bash", {"command": "true"})])
    first = api.poll(env, block_ms=500, reclaim_older_than_ms=400)
    assert first is not None and first.data.id == session and first.secret
    assert api.poll(env, block_ms=100, reclaim_older_than_ms=400) is None  # delivered, not yet reclaimable
    time.sleep(0.5)
    again = api.poll(env, block_ms=500, reclaim_older_than_ms=400)
    assert again is not None and again.id == first.id  # never acknowledged: delivered again

    assert api.ack(first.id, environment_id=env).state == "starting"
    with pytest.raises(ConflictError):
        api.ack(first.id, environment_id=env)


def test_heartbeat_compare_and_set_stop_and_the_items_own_token(standin: EnvironmentStandIn) -> None:
    api, env = client(standin).beta.environments.work, standin.environment_id
    session = standin.create_session([("bash", {"command": "true"})])
    item = api.poll(env, block_ms=500)
    assert item is not None and item.secret is not None
    api.ack(item.id, environment_id=env)
    own = client(standin, sessions_token(item.secret)).beta.environments.work

    with pytest.raises(PreconditionFailedError) as stale:
        own.heartbeat(item.id, environment_id=env, expected_last_heartbeat="2026-01-01T00:00:00Z")
    assert "expected_last_heartbeat" in str(stale.value)
    beat = own.heartbeat(item.id, environment_id=env, expected_last_heartbeat="NO_HEARTBEAT")
    assert beat.lease_extended and beat.state == "active"
    assert own.heartbeat(item.id, environment_id=env, expected_last_heartbeat=beat.last_heartbeat).lease_extended

    other = standin.enqueue(session)
    with pytest.raises(PermissionDeniedError):  # a sessions token is for its own item only
        own.stop(other, environment_id=env)
    with pytest.raises(PermissionDeniedError):  # and it cannot poll
        own.poll(env, block_ms=1)

    assert own.stop(item.id, environment_id=env).state == "stopping"
    assert api.stop(item.id, environment_id=env, force=True).state == "stopped"
    with pytest.raises(ConflictError):
        api.stop(item.id, environment_id=env, force=True)


def test_an_endpoint_it_does_not_implement_is_refused_and_recorded() -> None:
    standin = EnvironmentStandIn(environment_key=KEY)
    serving = serve(standin)
    next(serving)
    with pytest.raises(InternalServerError, match="does not implement"):
        client(standin).get(f"/v1/environments/{standin.environment_id}/archive", cast_to=object)
    assert standin.unexpected == [f"GET /v1/environments/{standin.environment_id}/archive"]
    with pytest.raises(AssertionError, match="does not implement"):
        next(serving, None)
