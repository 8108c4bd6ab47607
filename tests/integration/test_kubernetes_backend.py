"""What only the kubernetes backend has, against the stand-in of the pods API.

The conformance suite (tests/e2e/test_sandbox_backends.py) holds for kubernetes too; these
tests add the rest: the claim is a JSON Patch (its content type as the pinned client
sends it) that a second replica loses with a 422 and the gateway then takes the next
pooled pod; pod names and labels hold for every legal session id, and the session label
is per tenant; a pod whose server is not ready is never handed out; reconciliation by
labels; in ``pvc`` mode, a pooled pod's claim becomes the session's and outlives its
pods, and other installations' claims are left alone; the verbs used are exactly the
gateway Role's, in both volume modes; and a real gateway process recalls a conversation
through the backend after the session's pod died. Pods run the real server (and, for
turns, the real SDK and CLI against the local model); conversations outlive pods in a
real Redis (``emptydir`` mode) or on their claim (``pvc`` mode).

Independent pods start side by side: each is a real server process, which takes seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes.aio.client import ApiClient, Configuration

from harness.processes import free_port
from hosting.gateway.provisioning import Provisioner
from hosting.gateway.reconcile import reconcile
from hosting.gateway.routing.memory import MemoryRoutingStore
from hosting.gateway.routing.records import PoolEntry, Route
from hosting.gateway.settings import GatewaySettings
from hosting.sandboxes import Health, SandboxError, SandboxSpec
from hosting.sandboxes.kubernetes import (
    INSTALLATION_LABEL,
    SESSION_ANNOTATION,
    SESSION_LABEL,
    TENANT_ANNOTATION,
    VOLUME_ANNOTATION,
    VOLUME_LABEL,
    KubernetesBackend,
    claim_name,
    pod_name,
    session_label,
    volume_label,
)
from hosting.sandboxes.settings import open_backend
from hosting.settings_env import ConfigError
from tests.integration.test_kubernetes_manifests import OVERLAYS, render
from tests.standins.k8s import JSON_PATCH, POD_TEMPLATE, PodsApiStandIn, label_errors, running_standin
from tests.support import ROOT
from tests.support.gateways import ALICE, Gateways, auth
from tests.support.polling import wait_for_async
from tests.support.servers import API_KEY, LocalModel
from tests.support.turns import post_turn

pytestmark = pytest.mark.kubernetes

ROLES = {"emptydir": OVERLAYS["base"], "pvc": OVERLAYS["kind-session-volumes"]}
"""Where the gateway's Role is rendered from, for each volume mode."""
LONGEST_SESSION_ID = "A_" + "b-" * 31
"""64 characters, upper case and ``_``: legal for the server, too long for a label value."""


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodsApiStandIn]:
    """One stand-in for the module, so its recorded verbs cover every test here."""
    with running_standin(tmp_path_factory.mktemp("standin")) as made:
        yield made


@pytest.fixture(scope="module")
def kubeconfig(standin: PodsApiStandIn, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return standin.kubeconfig(tmp_path_factory.mktemp("kube") / "config")


@pytest.fixture(scope="module")
def pvc_standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodsApiStandIn]:
    """The stand-in of the ``pvc`` mode tests, so its recorded verbs are that mode's only."""
    with running_standin(tmp_path_factory.mktemp("pvc-standin")) as made:
        yield made


@pytest.fixture(scope="module")
def pvc_kubeconfig(pvc_standin: PodsApiStandIn, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pvc_standin.kubeconfig(tmp_path_factory.mktemp("pvc-kube") / "config")


async def remove_made(standin: PodsApiStandIn, backends: list[KubernetesBackend]) -> None:
    """Every pod (failed ones too, which list() leaves out) of these backends' installations,
    at once (grace 0, as ``kubectl delete --now`` would: tests that care delete gracefully
    themselves), then their claims through the backends; then close the backends."""
    for backend in backends:
        try:
            for name in standin.pod_names():
                if installation_of(standin.pod(name)) == backend.installation:
                    api(standin, "DELETE", f"pods/{name}", {"gracePeriodSeconds": 0})
            claims = [claim for claim in map(standin.claim, standin.claim_names())
                      if backend.volumes == "pvc" and installation_of(claim) == backend.installation]
            for claim in claims:
                assert claim is not None
                await backend.delete_volume(claim["metadata"]["annotations"][VOLUME_ANNOTATION])
        finally:
            await backend.aclose()


@pytest.fixture
async def opened(standin: PodsApiStandIn) -> AsyncIterator[list[KubernetesBackend]]:
    """Backends a test opens (replicas of one installation); everything they made is
    removed at teardown, then the backends are closed."""
    backends: list[KubernetesBackend] = []
    yield backends
    await remove_made(standin, backends)


@pytest.fixture
async def pvc_opened(pvc_standin: PodsApiStandIn) -> AsyncIterator[list[KubernetesBackend]]:
    """As :func:`opened`, on the ``pvc`` mode tests' stand-in."""
    backends: list[KubernetesBackend] = []
    yield backends
    await remove_made(pvc_standin, backends)


def installation_of(obj: dict[str, Any] | None) -> str | None:
    labels: dict[str, str] = ((obj or {}).get("metadata") or {}).get("labels") or {}
    return labels.get(INSTALLATION_LABEL)


def open_with(opened: list[KubernetesBackend], kubeconfig: Path, standin: PodsApiStandIn, installation: str,
              **options: Any) -> KubernetesBackend:
    backend = KubernetesBackend(POD_TEMPLATE, standin.namespace, installation, kubeconfig=kubeconfig, **options)
    opened.append(backend)
    return backend


@pytest.fixture
def backend(opened: list[KubernetesBackend], kubeconfig: Path, standin: PodsApiStandIn) -> KubernetesBackend:
    return open_with(opened, kubeconfig, standin, f"t{secrets.token_hex(4)}")


def spec(session_id: str | None = None, volume: str | None = None, **env: str) -> SandboxSpec:
    """A fresh sandbox (on a fresh volume unless given); no model answers at its endpoint
    unless the test passes one."""
    return SandboxSpec(f"k8s-{secrets.token_hex(5)}", volume or f"vol-{secrets.token_hex(4)}",
                       secrets.token_urlsafe(24),
                       {"ANTHROPIC_API_KEY": "unused", "ANTHROPIC_BASE_URL": "http://127.0.0.1:9", **env},
                       session_id, "acme" if session_id else None)


def metadata(standin: PodsApiStandIn, sandbox_id: str) -> dict[str, Any]:
    pod = standin.pod(pod_name(sandbox_id))
    assert pod is not None, f"no pod for {sandbox_id}"
    found: dict[str, Any] = pod["metadata"]
    return found


def token_of(standin: PodsApiStandIn, sandbox_id: str) -> str:
    pod = standin.pod(pod_name(sandbox_id))
    assert pod is not None
    token: str = next(e["value"] for e in pod["spec"]["containers"][0]["env"] if e["name"] == "AGENT_AUTH_TOKEN")
    return token


async def test_the_pod_is_the_template_plus_the_sandbox(backend: KubernetesBackend) -> None:
    """Everything but the per-sandbox parts comes from the template file; the spec's
    environment wins over the template's; the token is the server's and the probe's."""
    made = spec("Upper_Case_ID", ANTHROPIC_BASE_URL="http://127.0.0.1:9")
    pod = backend.manifest(made)
    template = yaml.safe_load(POD_TEMPLATE.read_text())
    assert pod["spec"]["securityContext"] == template["spec"]["securityContext"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    container = pod["spec"]["containers"][0]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert len(env) == len(container["env"])  # each name once
    assert env["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9" and env["AGENT_AUTH_TOKEN"] == made.token
    assert (env["HOST"], env["PORT"], env["AGENT_DATA_DIR"]) == ("0.0.0.0", "8000", "/data")
    assert container["readinessProbe"]["httpGet"]["httpHeaders"] == [
        {"name": "Authorization", "value": f"Bearer {made.token}"}]
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "sandbox"
    assert pod["metadata"]["labels"][SESSION_LABEL] == session_label("acme", "Upper_Case_ID")
    assert pod["metadata"]["annotations"][SESSION_ANNOTATION] == "Upper_Case_ID"
    assert template["spec"]["containers"][0]["env"] != container["env"]  # the template itself is untouched
    assert pod["spec"]["volumes"] == template["spec"]["volumes"]  # emptydir mode: /data is the template's


def test_the_session_label_is_per_tenant() -> None:
    """Session ids are per tenant: alice's ``trip-1`` and bob's ``trip-1`` are two sessions, so
    their pods' labels differ; the label is 32 hex characters of the SHA-256 of
    ``tenant/session_id``, and empty for a warm-pool pod."""
    alice, bob = session_label("alice", "trip-1"), session_label("bob", "trip-1")
    assert alice != bob and alice == hashlib.sha256(b"alice/trip-1").hexdigest()[:32]
    assert not label_errors({SESSION_LABEL: alice}) and len(alice) == 32
    assert session_label("alice", None) == session_label(None, None) == ""


async def test_names_and_labels_hold_the_longest_legal_session_id(backend: KubernetesBackend,
                                                                   standin: PodsApiStandIn) -> None:
    """A pod made for a 64-character session id with upper case and ``_``, and a pooled pod
    claimed for it: both pass the API's name and label validation (the stand-in's, which
    refuses that id as a label value), and both carry the id back to the gateway. The claim
    labels the pod with the claiming tenant's session, as create does."""
    session_id = LONGEST_SESSION_ID
    assert label_errors({SESSION_LABEL: session_id})  # what a label holding the id would meet
    direct, pooled = await asyncio.gather(backend.create(spec(session_id)), backend.create(spec()))
    claimed = await backend.claim(pooled, session_id, "Tenant.One")
    assert claimed is not None and (claimed.session_id, claimed.tenant) == (session_id, "Tenant.One")
    for sandbox, tenant in ((direct, "acme"), (claimed, "Tenant.One")):
        labels = metadata(standin, sandbox.sandbox_id)["labels"]
        assert labels[SESSION_LABEL] == session_label(tenant, session_id) and not label_errors(labels)
        assert metadata(standin, sandbox.sandbox_id)["annotations"][SESSION_ANNOTATION] == session_id
    assert session_label("acme", session_id) != session_label("Tenant.One", session_id)  # one id, two sessions
    assert {(s.sandbox_id, s.session_id) for s in await backend.list()} == {
        (direct.sandbox_id, session_id), (pooled.sandbox_id, session_id)}


async def test_the_claim_is_a_json_patch_and_a_second_claim_loses(backend: KubernetesBackend,
                                                                  opened: list[KubernetesBackend],
                                                                  kubeconfig: Path, standin: PodsApiStandIn) -> None:
    """The pinned client sends the claim as ``application/json-patch+json`` (the stand-in
    answers anything else with 415, as the API does for a type it cannot apply); a
    replica that claims the same pod afterwards fails the patch's ``test`` (422) and
    gets ``None``; the pod keeps the first claim."""
    sandbox = await backend.create(spec())
    replica = open_with(opened, kubeconfig, standin, backend.installation)
    before = len(standin.patch_types)
    assert await backend.claim(sandbox, "first", "acme") is not None
    assert await replica.claim(sandbox, "second", "bob") is None
    assert standin.patch_types[before:] == [JSON_PATCH, JSON_PATCH]
    annotations = metadata(standin, sandbox.sandbox_id)["annotations"]
    assert (annotations[SESSION_ANNOTATION], annotations[TENANT_ANNOTATION]) == ("first", "acme")

    merge = httpx.patch(f"{standin.url}/api/v1/namespaces/{standin.namespace}/pods/{pod_name(sandbox.sandbox_id)}",
                        json={"metadata": {"labels": {SESSION_LABEL: ""}}},
                        headers={"authorization": f"Bearer {standin.token}",
                                 "content-type": "application/merge-patch+json"})
    assert merge.status_code == 415 and merge.json()["reason"] == "UnsupportedMediaType"
    assert "application/merge-patch+json" in standin.unexpected.pop()
    assert metadata(standin, sandbox.sandbox_id)["labels"][SESSION_LABEL] == session_label("acme", "first")


async def test_a_claim_conflict_moves_the_gateway_on_to_the_next_pod(
        backend: KubernetesBackend, standin: PodsApiStandIn) -> None:
    """Two pooled pods; another replica (on a client its caller made) claims the first
    behind this gateway's routing store, as one sharing the engine but not the store
    would. The provisioner's claim of it fails at the API, and it takes the second."""
    specs = [spec(), spec()]
    store = MemoryRoutingStore()
    pooled = await asyncio.gather(*(backend.create(made) for made in specs))
    for sandbox, made in zip(pooled, specs, strict=True):
        await store.pool_put(PoolEntry(sandbox, made.token))
    configuration = Configuration(host=standin.url, api_key={"BearerToken": standin.token},
                                  api_key_prefix={"BearerToken": "Bearer"})
    async with ApiClient(configuration) as client:  # a client the caller made and closes
        other = KubernetesBackend(POD_TEMPLATE, standin.namespace, backend.installation, api_client=client)
        assert await other.claim(pooled[0], "taken-elsewhere", "bob") is not None
        await other.aclose()
        assert await other.exists(pooled[0].sandbox_id)

    route = await Provisioner(backend, store, {}, 30).ensure("Conflict_Session", "acme")
    assert route.sandbox_id == pooled[1].sandbox_id
    assert metadata(standin, pooled[1].sandbox_id)["annotations"][SESSION_ANNOTATION] == "Conflict_Session"
    assert metadata(standin, pooled[0].sandbox_id)["annotations"][SESSION_ANNOTATION] == "taken-elsewhere"
    await store.aclose()


async def test_a_pod_whose_server_is_not_ready_is_never_handed_out(
        backend: KubernetesBackend, opened: list[KubernetesBackend], kubeconfig: Path,
        standin: PodsApiStandIn) -> None:
    """A server over its disk budget answers ``/ready`` with 503, so the kubelet's probe
    keeps the pod un-Ready: ``create`` gives up after its timeout and removes the pod,
    and a running but un-Ready pod (made behind the backend's back) cannot be claimed."""
    impatient = open_with(opened, kubeconfig, standin, backend.installation, start_timeout=5)
    never_ready = spec(AGENT_DISK_BUDGET_BYTES="1")
    failing = asyncio.create_task(impatient.create(never_ready))  # meanwhile, the second half

    unready = spec(AGENT_DISK_BUDGET_BYTES="1")
    created = httpx.post(f"{standin.url}/api/v1/namespaces/{standin.namespace}/pods", json=backend.manifest(unready),
                         headers={"authorization": f"Bearer {standin.token}"})
    assert created.status_code == 201
    deadline = time.monotonic() + 30
    while not (listed := [s for s in await backend.list() if s.sandbox_id == unready.sandbox_id and s.address]):
        assert time.monotonic() < deadline, "the pod never ran"
        await asyncio.sleep(0.1)
    while (answer := await backend.ask_ready(listed[0].address, unready.token)) is None:
        assert time.monotonic() < deadline, "the un-Ready pod's server never answered"
        await asyncio.sleep(0.1)
    assert answer.status_code == 503
    assert await backend.health(listed[0], unready.token) is Health.STARTING
    assert await backend.claim(listed[0], "must-not-get-it", "acme") is None
    assert metadata(standin, unready.sandbox_id)["labels"][SESSION_LABEL] == ""
    with pytest.raises(SandboxError, match="not ready within 5 s"):
        await failing
    assert standin.traces(pod_name(never_ready.sandbox_id)) == []


async def test_reconcile_by_labels_adopts_removes_orphans_and_releases_the_lost(
        backend: KubernetesBackend, standin: PodsApiStandIn) -> None:
    """The gateway's start-up reconciliation through this backend: a routed pod is
    adopted, a pod nobody routes to is removed, and a route whose pod crashed (phase
    Failed: not listed) is released; deleting the crashed pod leaves nothing."""
    store = MemoryRoutingStore()
    routed_spec, orphan_spec, crashed_spec = spec("routed-1"), spec("orphan-1"), spec("crashed-1")
    routed, orphan, crashed = await asyncio.gather(*(backend.create(made) for made in (routed_spec, orphan_spec,
                                                                                       crashed_spec)))
    for sandbox, made in ((routed, routed_spec), (crashed, crashed_spec)):
        assert sandbox.session_id is not None
        await store.put(Route(sandbox.session_id, "acme", made.volume).with_sandbox(sandbox, made.token))
    standin.kill(pod_name(crashed.sandbox_id))

    result = await reconcile(backend, store)
    assert (result.adopted, result.removed, result.released) == (
        [routed.sandbox_id], [orphan.sandbox_id], [crashed.sandbox_id])
    assert standin.traces(pod_name(orphan.sandbox_id)) == []
    assert {s.sandbox_id for s in await backend.list()} == {routed.sandbox_id}
    assert standin.pod(pod_name(crashed.sandbox_id)) is not None  # a failed pod stays until deleted
    await backend.delete(crashed.sandbox_id)
    assert standin.traces(pod_name(crashed.sandbox_id)) == []
    await store.aclose()


@pytest.mark.e2e
async def test_a_gateway_recalls_a_conversation_after_its_pod_died(
        standin: PodsApiStandIn, kubeconfig: Path, local_model: LocalModel, tmp_path: Path, redis_url: str,
        opened: list[KubernetesBackend]) -> None:
    """A real gateway process on the kubernetes backend: the first turn runs in a claimed
    pool pod; the pod dies; the next turn of the same session gets a new pod, which
    restores the conversation from the SessionStore and recalls it. Neither the sandbox's
    token nor the model key appears in the gateway's log."""
    factory = Gateways(local_model, tmp_path, "kubernetes", None)
    open_with(opened, kubeconfig, standin, factory.installation)  # removes what the gateway leaves at teardown
    session = "K8s_Recall_Session"
    try:
        gateway = await asyncio.to_thread(
            factory.start, GATEWAY_KUBECONFIG=str(kubeconfig), GATEWAY_KUBERNETES_POD_TEMPLATE=str(POD_TEMPLATE),
            GATEWAY_KUBERNETES_NAMESPACE=standin.namespace, AGENT_SESSION_STORE=redis_url)
        first = await asyncio.to_thread(post_turn, gateway.base_url, session, "Remember this value: 42",
                                        headers=auth(ALICE))
        assert first.types[-1] == "done" and not first.result["is_error"]
        route = gateway.route(session)
        assert route is not None and route["backend"] == "kubernetes"
        labels = metadata(standin, route["sandbox_id"])["labels"]
        assert labels[SESSION_LABEL] == session_label("alice", session)
        first_token = token_of(standin, route["sandbox_id"])

        standin.kill(pod_name(route["sandbox_id"]))
        recalled = await asyncio.to_thread(post_turn, gateway.base_url, session,
                                           "What value did I ask you to remember?", headers=auth(ALICE))
        assert "You asked me to remember 42." in recalled.text
        assert recalled.of("session")[0]["resumed"] is True
        replaced = gateway.route(session)
        assert replaced is not None and replaced["sandbox_id"] != route["sandbox_id"]
        assert standin.traces(pod_name(route["sandbox_id"])) == []
        for secret in (first_token, API_KEY):
            assert secret not in gateway.log()
    finally:
        await asyncio.to_thread(factory.cleanup)


@pytest.mark.docker
@pytest.mark.e2e
async def test_the_product_image_serves_a_turn_confined_as_the_template_says(
        backend: KubernetesBackend, agent_image: str, local_model: LocalModel) -> None:
    """No cluster runs here, so Docker confines the real image as the template's pod would
    be: its user and group, a read-only root, every capability dropped, no privilege
    escalation, and only the template's emptyDir mounts writable (tmpfs owned by the
    fsGroup), with the environment the backend puts in the pod. The server takes a turn
    through the real CLI; nothing outside those mounts can be written. (Host network, so
    the server listens on a loopback port instead of the pod's own 8000.)"""
    import docker

    made = spec(ANTHROPIC_BASE_URL=local_model.base_url, ANTHROPIC_API_KEY=API_KEY)
    pod = backend.manifest(made)
    container, security = pod["spec"]["containers"][0], pod["spec"]["securityContext"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e["value"] for e in container["env"]} | {"HOST": "127.0.0.1", "PORT": str(free_port())}
    writable = {m["mountPath"]: f"uid={security['runAsUser']},gid={security['fsGroup']},mode=0770"
                for m in container["volumeMounts"]}
    client = docker.from_env()
    running = client.containers.run(
        agent_image, container["args"], detach=True, name=f"k8s-template-{made.sandbox_id}", network_mode="host",
        user=f"{security['runAsUser']}:{security['runAsGroup']}", environment=env, tmpfs=writable,
        read_only=container["securityContext"]["readOnlyRootFilesystem"], cap_drop=["ALL"],
        security_opt=["no-new-privileges"])
    try:
        address = f"http://127.0.0.1:{env['PORT']}"
        deadline = time.monotonic() + 90
        while (answer := await backend.ask_ready(address, made.token)) is None or answer.status_code != 200:
            assert time.monotonic() < deadline, running.logs().decode(errors="replace")[-3000:]
            await asyncio.sleep(0.2)
        first = await asyncio.to_thread(post_turn, address, "Confined_1", "Remember this value: 42",
                                        headers=auth(made.token))
        assert first.types[-1] == "done" and not first.result["is_error"], first.events
        assert b"Read-only file system" in running.exec_run(["touch", "/app/written"]).output
        assert running.exec_run(["touch", "/data/written", "/tmp/written"]).exit_code == 0
    finally:
        running.remove(force=True)
        client.close()


def data_volume(standin: PodsApiStandIn, sandbox_id: str) -> dict[str, Any]:
    pod = standin.pod(pod_name(sandbox_id))
    assert pod is not None
    found: dict[str, Any] = next(v for v in pod["spec"]["volumes"] if v["name"] == "data")
    return found


def api(standin: PodsApiStandIn, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    """A call to the stand-in as another client of the API would make it (an operator, another installation)."""
    return httpx.request(method, f"{standin.url}/api/v1/namespaces/{standin.namespace}/{path}", json=body,
                         headers={"authorization": f"Bearer {standin.token}"})


async def test_pvc_mode_keeps_to_its_own_claims(pvc_opened: list[KubernetesBackend], pvc_kubeconfig: Path,
                                                pvc_standin: PodsApiStandIn) -> None:
    """Claims are named by installation and volume, so another installation's claim of the
    same volume name is never touched; a claim under this installation's name that another
    installation labelled is neither mounted nor deleted; a failed create removes the claim
    it made and keeps one it found; a claim being deleted (a pod still names it) is not
    mounted again. No server runs here: the failing pods' image does not exist. (The stand-in
    refuses claim calls the backend does not make.)"""
    standin = pvc_standin
    ours = open_with(pvc_opened, pvc_kubeconfig, standin, f"t{secrets.token_hex(4)}", volumes="pvc")
    theirs = open_with(pvc_opened, pvc_kubeconfig, standin, f"{ours.installation}-other", volumes="pvc")
    failing = open_with(pvc_opened, pvc_kubeconfig, standin, ours.installation, volumes="pvc",
                        image="research-agent:no-such-image")
    volume = "Shared_Volume." + "x" * 50  # 64 characters ending in ".": no label value
    assert volume_label(volume) != volume and not label_errors({VOLUME_LABEL: volume_label(volume)})

    assert api(standin, "POST", "persistentvolumeclaims", theirs.claim_manifest(volume)).status_code == 201
    squatter = ours.claim_manifest(volume)
    squatter["metadata"]["labels"][INSTALLATION_LABEL] = theirs.installation
    assert api(standin, "POST", "persistentvolumeclaims", squatter).status_code == 201
    with pytest.raises(SandboxError, match="not this installation's"):
        await ours.create(spec(volume=volume))
    await ours.delete_volume(volume)
    assert {claim_name(i, volume) for i in (ours.installation, theirs.installation)} <= standin.claim_names()
    assert not [n for n in standin.pod_names() if installation_of(standin.pod(n)) == ours.installation]
    assert api(standin, "DELETE", f"persistentvolumeclaims/{claim_name(ours.installation, volume)}").status_code == 200
    # As on a cluster, a deleted claim goes once its protection finalizer is lifted, not at once.
    await wait_for_async(lambda: claim_name(ours.installation, volume) not in standin.claim_names(), timeout=10)

    with pytest.raises(SandboxError, match="ErrImagePull"):
        await failing.create(spec(volume=volume))
    assert claim_name(ours.installation, volume) not in standin.claim_names()  # made by that call: removed
    assert api(standin, "POST", "persistentvolumeclaims", ours.claim_manifest(volume)).status_code == 201
    found = standin.claim(claim_name(ours.installation, volume))
    with pytest.raises(SandboxError, match="ErrImagePull"):
        await failing.create(spec(volume=volume))
    kept = standin.claim(claim_name(ours.installation, volume))
    assert found is not None and kept is not None and kept["metadata"]["uid"] == found["metadata"]["uid"]

    holder = spec(volume=volume)  # a pod that stays (pulling its image), naming the claim
    assert api(standin, "POST", "pods", failing.manifest(holder)).status_code == 201
    deadline = time.monotonic() + 10
    while not (standin.pod(pod_name(holder.sandbox_id)) or {}).get("spec", {}).get("nodeName"):
        assert time.monotonic() < deadline, "the pod was never scheduled"
        await asyncio.sleep(0.05)
    assert api(standin, "DELETE", f"persistentvolumeclaims/{claim_name(ours.installation, volume)}").status_code == 200
    with pytest.raises(SandboxError, match="is being deleted"):
        await ours.create(spec(volume=volume))
    await ours.delete(holder.sandbox_id)  # the last pod naming it: the claim goes
    deadline = time.monotonic() + 10
    while claim_name(ours.installation, volume) in standin.claim_names():
        assert time.monotonic() < deadline, "the claim stayed after its last pod"
        await asyncio.sleep(0.05)
    assert claim_name(theirs.installation, volume) in standin.claim_names()

    theirs_path = f"persistentvolumeclaims/{claim_name(theirs.installation, volume)}"
    for method, path in (("GET", "persistentvolumeclaims"), ("PATCH", theirs_path)):  # the backend sends neither
        assert api(standin, method, path).status_code == 405
        assert f"{method} /api/v1/namespaces/{standin.namespace}/{path}" in standin.unexpected.pop()


def granted(mode: str) -> set[tuple[str, str]]:
    """The (verb, resource) pairs the gateway's Role grants, as kustomize renders it for ``mode``."""
    (role,) = [o for o in render(ROLES[mode]) if o["kind"] == "Role"]
    assert all(rule["apiGroups"] == [""] for rule in role["rules"])
    return {(verb, resource) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}


async def test_the_gateway_role_grants_exactly_the_verbs_the_backend_uses(
        backend: KubernetesBackend, standin: PodsApiStandIn) -> None:
    """Every call the backend makes in ``emptydir`` mode (commands aside: the gateway runs
    none), once more here (create, get, list, patch, delete), and all the module's tests
    before: the set of (verb, resource) the stand-in received equals what the gateway's Role
    grants (base), neither more nor less. ``pvc`` mode: the last test below."""
    made = spec()
    sandbox = await backend.create(made)
    assert await backend.exists(made.sandbox_id)
    assert await backend.claim(sandbox, "role-check", "acme") is not None
    assert sandbox.sandbox_id in {s.sandbox_id for s in await backend.list()}
    await backend.delete(made.sandbox_id)
    await backend.delete_volume(made.volume)
    assert standin.verbs == granted("emptydir")


async def test_pvc_mode_a_pooled_pods_claim_becomes_the_sessions_and_the_role_grants_its_verbs(
        pvc_opened: list[KubernetesBackend], pvc_kubeconfig: Path, pvc_standin: PodsApiStandIn) -> None:
    """``pvc`` mode: a warm-pool pod gets a claim for its own volume (ReadWriteOnce, the size
    and class asked for, labelled with the installation and the volume, the volume's name
    annotated), mounted at the server's data dir in place of the emptyDir. Claimed, the pod and
    its claim are the session's (the conformance suite's ``kubernetes-pvc`` cases show a
    replacement pod resuming the conversation from the claim). While a pod of the installation
    runs on the volume, ``delete_volume`` refuses; once its server has died, it deletes that
    failed pod (the API keeps a claim while any pod names it), then the claim and its data,
    and waits until it is gone; a second delete is fine.

    That makes every call of ``pvc`` mode, so then, with the module's other ``pvc`` tests
    before, the (verb, resource) pairs its stand-in received equal what the gateway's Role
    grants with the session-volumes component: the pods' verbs, and the claims' ``create``,
    ``get`` and ``delete``, neither more nor less."""
    standin = pvc_standin
    backend = open_with(pvc_opened, pvc_kubeconfig, standin, f"t{secrets.token_hex(4)}", volumes="pvc",
                        volume_size="2Gi", storage_class="standard")
    pooled_spec = spec()
    pooled = await backend.create(pooled_spec)
    name = claim_name(backend.installation, pooled_spec.volume)
    claim = standin.claim(name)
    assert claim is not None and claim["status"]["phase"] == "Bound"
    assert {k: claim["metadata"]["labels"][k] for k in (INSTALLATION_LABEL, VOLUME_LABEL)} == {
        INSTALLATION_LABEL: backend.installation, VOLUME_LABEL: pooled_spec.volume}
    assert claim["metadata"]["annotations"][VOLUME_ANNOTATION] == pooled_spec.volume
    assert (claim["spec"]["accessModes"], claim["spec"]["resources"], claim["spec"]["storageClassName"]) == (
        ["ReadWriteOnce"], {"requests": {"storage": "2Gi"}}, "standard")
    assert data_volume(standin, pooled.sandbox_id) == {"name": "data", "persistentVolumeClaim": {"claimName": name}}
    environment = standin.environment(pod_name(pooled.sandbox_id))
    assert environment is not None and environment["AGENT_DATA_DIR"] == str(standin.claim_dir(name))

    claimed = await backend.claim(pooled, "Trip_1", "alice")
    assert claimed is not None and claimed.volume == pooled_spec.volume
    assert metadata(standin, pooled.sandbox_id)["labels"][SESSION_LABEL] == session_label("alice", "Trip_1")
    with pytest.raises(SandboxError, match=f"in use by sandbox {pooled.sandbox_id}"):
        await backend.delete_volume(pooled_spec.volume)
    standin.kill(pod_name(pooled.sandbox_id))  # crashed, and nobody deleted its pod: the claim stays
    assert standin.claim(name) is not None and standin.claim_dir(name).is_dir()
    await backend.delete_volume(pooled_spec.volume)
    assert standin.pod(pod_name(pooled.sandbox_id)) is None
    assert standin.claim(name) is None and not standin.claim_dir(name).exists()
    await backend.delete_volume(pooled_spec.volume)

    assert standin.verbs == granted("pvc")


def test_settings_choose_the_kubernetes_backend_and_refuse_bad_values(tmp_path: Path, kubeconfig: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``GATEWAY_BACKEND=kubernetes`` with its settings opens the backend (volumes: ``emptydir``
    unless ``GATEWAY_KUBERNETES_VOLUMES=pvc``, claims of 1Gi of the cluster's default class
    unless set); a namespace no cluster could hold, a volume mode, size or storage class the
    API would not take, a missing template or one without the server's port (in ``pvc`` mode,
    without a volume at ``/data``), a missing kubeconfig, or no kubeconfig outside a cluster
    is refused at start-up with a message that names it."""
    env = {"GATEWAY_TENANTS": "t0k3n:acme", "ANTHROPIC_API_KEY": "x", "GATEWAY_BACKEND": "kubernetes",
           "GATEWAY_KUBERNETES_NAMESPACE": "agents", "GATEWAY_KUBERNETES_POD_TEMPLATE": str(POD_TEMPLATE),
           "GATEWAY_KUBECONFIG": str(kubeconfig), "GATEWAY_KUBERNETES_IMAGE": "registry.example/agent:1"}
    settings = GatewaySettings.from_env(env)
    backend = open_backend(settings.sandboxes)
    assert isinstance(backend, KubernetesBackend) and backend.namespace == "agents"
    assert backend.manifest(spec())["spec"]["containers"][0]["image"] == "registry.example/agent:1"
    assert (backend.volumes, backend.volume_size, backend.storage_class) == ("emptydir", "1Gi", None)
    assert "storageClassName" not in backend.claim_manifest("vol-1")["spec"]
    pvc = open_backend(GatewaySettings.from_env({**env, "GATEWAY_KUBERNETES_VOLUMES": "pvc",
                                                 "GATEWAY_KUBERNETES_VOLUME_SIZE": "500Mi",
                                                 "GATEWAY_KUBERNETES_STORAGE_CLASS": "fast-ssd.example.com"}).sandboxes)
    assert isinstance(pvc, KubernetesBackend) and pvc.volumes == "pvc"
    made = spec()
    assert next(v for v in pvc.manifest(made)["spec"]["volumes"] if v["name"] == "data") == {
        "name": "data", "persistentVolumeClaim": {"claimName": claim_name("default", made.volume)}}
    assert pvc.claim_manifest(made.volume)["spec"] == {"accessModes": ["ReadWriteOnce"], "storageClassName":
                                                       "fast-ssd.example.com", "resources": {"requests": {"storage": "500Mi"}}}
    for name, value in (("GATEWAY_KUBERNETES_NAMESPACE", "Not_A_Label"), ("GATEWAY_KUBERNETES_VOLUMES", "PVC"),
                        ("GATEWAY_KUBERNETES_VOLUMES", "hostpath"), ("GATEWAY_KUBERNETES_VOLUME_SIZE", "0"),
                        ("GATEWAY_KUBERNETES_VOLUME_SIZE", "1GB"), ("GATEWAY_KUBERNETES_VOLUME_SIZE", "lots"),
                        ("GATEWAY_KUBERNETES_STORAGE_CLASS", "Fast_SSD")):
        with pytest.raises(ConfigError, match=name):
            GatewaySettings.from_env({**env, name: value})
    dataless = tmp_path / "dataless.yaml"
    template = yaml.safe_load(POD_TEMPLATE.read_text())
    template["spec"]["containers"][0]["volumeMounts"] = [m for m in template["spec"]["containers"][0]["volumeMounts"]
                                                         if m["mountPath"] != "/data"]
    dataless.write_text(yaml.safe_dump(template))
    with pytest.raises(SandboxError, match="needs a volume mounted at /data"):
        open_backend(GatewaySettings.from_env({**env, "GATEWAY_KUBERNETES_POD_TEMPLATE": str(dataless),
                                               "GATEWAY_KUBERNETES_VOLUMES": "pvc"}).sandboxes)
    with pytest.raises(SandboxError, match="cannot read the pod template"):
        open_backend(GatewaySettings.from_env({**env, "GATEWAY_KUBERNETES_POD_TEMPLATE": str(tmp_path / "none")}).sandboxes)
    portless = tmp_path / "portless.yaml"
    template = yaml.safe_load(POD_TEMPLATE.read_text())
    del template["spec"]["containers"][0]["ports"]
    portless.write_text(yaml.safe_dump(template))
    with pytest.raises(SandboxError, match="port named 'http'"):
        open_backend(GatewaySettings.from_env({**env, "GATEWAY_KUBERNETES_POD_TEMPLATE": str(portless)}).sandboxes)
    with pytest.raises(SandboxError, match="no kubeconfig file at"):
        open_backend(GatewaySettings.from_env({**env, "GATEWAY_KUBECONFIG": str(tmp_path / "none")}).sandboxes)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(SandboxError, match="no kubeconfig given and not in a cluster"):
        open_backend(GatewaySettings.from_env({k: v for k, v in env.items() if k != "GATEWAY_KUBECONFIG"}).sandboxes)


async def test_an_unreachable_api_or_a_bad_kubeconfig_is_a_sandbox_error(tmp_path: Path) -> None:
    """The gateway turns these into a failed provisioning (503), never a crash."""
    broken = tmp_path / "broken"
    broken.write_text("apiVersion: v1\nkind: Config\n")
    unusable = KubernetesBackend(POD_TEMPLATE, kubeconfig=broken)
    with pytest.raises(SandboxError, match="cannot use the kubeconfig"):
        await unusable.list()
    await unusable.aclose()
    closed = tmp_path / "config"
    closed.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    unreachable = KubernetesBackend(POD_TEMPLATE, kubeconfig=closed)
    with pytest.raises(SandboxError, match="cannot reach the API server"):
        await unreachable.list()
    await unreachable.aclose()


def test_without_the_client_says_how_to_install_it() -> None:
    code = ("import sys; sys.modules['kubernetes'] = None\n"
            "from hosting.sandboxes import SandboxError\n"
            "from hosting.sandboxes.kubernetes import KubernetesBackend\n"
            "try:\n    KubernetesBackend()\nexcept SandboxError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == ('the kubernetes backend needs the Kubernetes client: '
                                   'pip install "research-agent-hosting[kubernetes]"')
