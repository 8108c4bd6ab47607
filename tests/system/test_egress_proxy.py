"""The egress proxy, for real, between network namespaces this test makes (no cluster here).

    sandbox netns             proxy netns                          upstream netns
    10.231.1.2 ── veth ── 10.231.1.1 | 10.231.2.1 ── veth ── 10.231.2.2
    the agent, the CLI,       Debian's nginx started by the        TLS stand-in: the local model,
    a placeholder key         project's entrypoint.sh and          the environment stand-in and
    (the pod template's env)  template; the key from a file        a recorder of every request's
                              (key port, runner port)              headers
    runner netns                         |
    10.231.3.2 ── veth ── 10.231.3.1 ────┘
    a Managed Agents runner
    with its item's token

No netns has a default route, so the sandbox and the runner can address only the proxy's
subnet, and the proxy netns does not forward. The proxy netns filters what comes in from
each of them by the rendered NetworkPolicies (``network_policy_rules``): the sandbox, an
agent pod, reaches the key port only; the runner, a runner pod, the runner port only.

The upstream's certificate comes from a CA made here, which the proxy trusts through
``EGRESS_CA_FILE``; names resolve through ``/etc/netns/<ns>/hosts`` (``ip netns exec``
mounts them over ``/etc/hosts``). The proxy runs as its own uid, the sandbox and the
runner as another, as in the cluster. Needs root (namespaces); everything is removed at
the end, also when a test fails.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
PROXY_DIR = ROOT / "hosting/kubernetes/egress-proxy"
POD_TEMPLATE = ROOT / "hosting/kubernetes/base/agent-pod-template.yaml"
UPSTREAM_HOST = "api.anthropic.test"
SANDBOX_IP, PROXY_IP, PROXY_UPSTREAM_SIDE_IP, UPSTREAM_IP = "10.231.1.2", "10.231.1.1", "10.231.2.1", "10.231.2.2"
RUNNER_IP, PROXY_RUNNER_SIDE_IP = "10.231.3.2", "10.231.3.1"
PROXY_PORT, HEALTH_PORT, RUNNER_PORT = 8080, 8081, 8082
UNTRUSTING_PORT, UNTRUSTING_HEALTH_PORT, UNTRUSTING_RUNNER_PORT = 8090, 8091, 8092
# Each proxy's ports by the names the egress proxy's Deployment gives them (the policies' ports).
PROXY_INSTANCES = ({"http": PROXY_PORT, "health": HEALTH_PORT, "runner": RUNNER_PORT},
                   {"http": UNTRUSTING_PORT, "health": UNTRUSTING_HEALTH_PORT, "runner": UNTRUSTING_RUNNER_PORT})
PROXY_UID, SANDBOX_UID = 10002, 10001  # the egress proxy image's user, the agent image's user
CLONE_NEWNET = 0x40000000
ENVIRONMENT_KEY = f"envkey-{secrets.token_hex(16)}"  # the environment stand-in's; never given to the sandbox
# A call that streams (the stand-in holds its last event), on each forwarding port: each forwards only its own calls.
STREAM_CALLS = {PROXY_PORT: ("POST", "/v1/messages"), RUNNER_PORT: ("GET", "/v1/sessions/sesn_stream/events/stream")}

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nginx", path="/usr/sbin"),
                                reason="needs root (network namespaces), iproute2 and nginx: scripts/install-test-tools.sh")

T = TypeVar("T")
LIBC = ctypes.CDLL(None, use_errno=True)


def in_netns(netns: str, action: Callable[[], T], timeout: float = 60) -> T:
    """Run ``action`` on a thread that joined ``netns``: its sockets live there. Only that
    thread moves (``setns`` is per thread), so the test process stays where it was."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if LIBC.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {netns} failed")
        finally:
            os.close(fd)
        try:
            outcome["value"] = action()
        except BaseException as exc:  # noqa: BLE001 - handed back to the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"action in {netns} did not finish within {timeout} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


# --- a CA, and the upstream's certificate -------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, issuer: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey,
                 ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass
class Pki:
    ca: Path
    other_ca: Path
    cert: Path
    key: Path


def make_pki(directory: Path) -> Pki:
    """A root CA, two intermediates (as behind a cross-signed root; nginx's default verify
    depth would refuse them) and the upstream's certificate, served with its chain; and an
    unrelated CA."""
    root_key, first_key, second_key, other_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(5))
    first = _certificate("egress test intermediate 1", "egress test CA", first_key, root_key, ca=True)
    second = _certificate("egress test intermediate 2", "egress test intermediate 1", second_key, first_key, ca=True)
    leaf = _certificate(UPSTREAM_HOST, "egress test intermediate 2", leaf_key, second_key, ca=False)
    files = {
        "ca.pem": _pem(_certificate("egress test CA", "egress test CA", root_key, root_key, ca=True)),
        "other-ca.pem": _pem(_certificate("some other CA", "some other CA", other_key, other_key, ca=True)),
        "upstream.pem": _pem(leaf) + _pem(second) + _pem(first),
        "upstream-key.pem": _pem(leaf_key),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return Pki(directory / "ca.pem", directory / "other-ca.pem", directory / "upstream.pem", directory / "upstream-key.pem")


# --- the upstream stand-in (runs in the upstream netns under uvicorn with TLS) ------------

def environments_app(key: str) -> Callable[..., Any]:
    """The Managed Agents environment stand-in (tests/standins/environments), with what an
    orchestrator does outside the sandbox under ``/test/environments/``: create a session
    (its work item polled and acknowledged with the environment key, through the stand-in's
    own HTTP API) and read back what the session's runner did."""
    from fastapi import FastAPI

    from tests.standins.environments.service import BETA, EnvironmentStandIn

    environments = EnvironmentStandIn(environment_key=key)
    control = FastAPI()

    @control.post("/test/environments/sessions")
    async def create(turn: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        session_id = environments.create_session(turn)
        path = f"/v1/environments/{environments.environment_id}/work"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=environments.app), base_url="http://standin",
                                     headers={"authorization": f"Bearer {key}", "anthropic-beta": BETA}) as orchestrator:
            item = (await orchestrator.get(f"{path}/poll")).raise_for_status().json()
            (await orchestrator.post(f"{path}/{item['id']}/ack")).raise_for_status()
        return {"environment_id": item["environment_id"], "work_id": item["id"], "session_id": session_id,
                "secret": item["secret"]}

    @control.get("/test/environments/sessions/{session_id}")
    async def done(session_id: str) -> dict[str, Any]:
        (item,) = environments.items_of(session_id)
        runners = [c for c in environments.calls if c.route not in ("poll", "poll.delivered", "ack")]
        return {"results": environments.results(session_id), "item_state": item.state, "unexpected": environments.unexpected,
                "credentials": sorted({c.credential for c in runners})}

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        await (control if scope["path"].startswith("/test/") else environments.app)(scope, receive, send)

    return app


def upstream_app() -> Callable[..., Any]:
    """The local model behind a recorder: every request's method, path and headers are appended
    to ``$EGRESS_TEST_RECORD``. A request with ``x-test-stream: hold`` gets one SSE event, then
    waits for the file ``$EGRESS_TEST_RELEASE`` before the last, so a test can tell streaming
    from buffering.
    Requests with the Managed Agents beta header, and ``/test/environments/``, go to the
    environment stand-in (``environments_app``)."""
    from hosting.local_model import create_app

    record = Path(os.environ["EGRESS_TEST_RECORD"])
    release = Path(os.environ["EGRESS_TEST_RELEASE"])
    model = create_app()
    environments = environments_app(os.environ["EGRESS_TEST_ENVIRONMENT_KEY"])

    async def stream(send: Callable[..., Any]) -> None:
        import asyncio

        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"event: first\ndata: {}\n\n", "more_body": True})
        deadline = time.monotonic() + 30
        while not release.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await send({"type": "http.response.body", "body": b"event: last\ndata: {}\n\n", "more_body": False})

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "http":
            headers = [[k.decode("latin-1").lower(), v.decode("latin-1")] for k, v in scope["headers"]]
            with record.open("a") as out:
                out.write(json.dumps({"method": scope["method"], "path": scope["path"], "headers": headers}) + "\n")
            if ["x-test-stream", "hold"] in headers:
                await stream(send)
                return
            if scope["path"].startswith("/test/environments/") or any(
                    k == "anthropic-beta" and "managed-agents" in v for k, v in headers):
                await environments(scope, receive, send)
                return
        await model(scope, receive, send)

    return app


@dataclass
class Upstream:
    record: Path
    release: Path

    def requests(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def requests_tagged(self, tag: str) -> list[dict[str, Any]]:
        return [r for r in self.requests() if ["x-test-id", tag] in r["headers"]]


# --- the topology --------------------------------------------------------------------------

@dataclass
class Topology:
    sandbox: str
    runner: str
    proxy: str
    upstream: str
    workdir: Path
    real_key: str
    pki: Pki


def _write_netns_files(netns: str, hosts: str) -> None:
    folder = Path("/etc/netns") / netns
    folder.mkdir(parents=True)
    (folder / "hosts").write_text(f"127.0.0.1 localhost\n{hosts}\n")
    (folder / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # no DNS: names come from hosts


def policy_reach() -> dict[str, set[str]]:
    """Which of the egress proxy's ports (by name) an agent pod and a runner pod may open, as
    the rendered NetworkPolicies say (the pods' labels from their templates, both sides'
    policies evaluated by tests/integration/test_kubernetes_manifests.py's ``allowed``)."""
    from tests.integration.test_kubernetes_manifests import OVERLAYS, Peer, allowed, pod_template_of, render

    objects = render(OVERLAYS["base"])
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "egress-proxy"]
    namespace = deployment["metadata"]["namespace"]
    proxy = Peer.pod(namespace, **deployment["spec"]["template"]["metadata"]["labels"])
    ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    pods = {"agent": pod_template_of(objects), "runner": pod_template_of(objects, "runner-pod-template")}
    return {kind: {name for name, port in ports.items()
                   if allowed(policies, Peer.pod(namespace, **pod["metadata"]["labels"]), proxy, port)}
            for kind, pod in pods.items()}


def network_policy_rules() -> list[list[str]]:
    """iptables rules for the proxy netns that let in from each veth what ``policy_reach``
    allows its pod, on each proxy's ports of those names, and reset every other connection
    (a reset, not a drop, so a refusal is told at once; a CNI drops)."""
    reach = policy_reach()
    rules = []
    for kind, device in (("agent", "to-sandbox"), ("runner", "to-runner")):
        rules += [["-A", "INPUT", "-i", device, "-p", "tcp", "--dport", str(instance[name]), "-j", "ACCEPT"]
                  for name in sorted(reach[kind]) for instance in PROXY_INSTANCES]
        rules += [["-A", "INPUT", "-i", device, "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
                  ["-A", "INPUT", "-i", device, "-j", "DROP"]]
    return rules


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    run = uuid.uuid4().hex[:8]
    names = {role: f"proxy-egress-{role}-{run}" for role in ("sb", "rn", "px", "up")}
    workdir = Path(tempfile.mkdtemp(prefix="egress-test-"))
    workdir.chmod(0o755)
    made_etc_netns = not Path("/etc/netns").exists()
    try:
        for netns in names.values():
            ip("netns", "add", netns)
            ip("-n", netns, "link", "set", "lo", "up")
        sb, rn, px, up = names["sb"], names["rn"], names["px"], names["up"]
        ip("-n", px, "link", "add", "to-sandbox", "type", "veth", "peer", "name", "eth0", "netns", sb)
        ip("-n", px, "link", "add", "to-runner", "type", "veth", "peer", "name", "eth0", "netns", rn)
        ip("-n", px, "link", "add", "to-upstream", "type", "veth", "peer", "name", "eth0", "netns", up)
        for netns, device, address in ((sb, "eth0", f"{SANDBOX_IP}/24"), (px, "to-sandbox", f"{PROXY_IP}/24"),
                                       (rn, "eth0", f"{RUNNER_IP}/24"), (px, "to-runner", f"{PROXY_RUNNER_SIDE_IP}/24"),
                                       (px, "to-upstream", f"{PROXY_UPSTREAM_SIDE_IP}/24"), (up, "eth0", f"{UPSTREAM_IP}/24")):
            ip("-n", netns, "addr", "add", address, "dev", device)
            ip("-n", netns, "link", "set", device, "up")
        subprocess.run(["ip", "netns", "exec", px, "sysctl", "-qw", "net.ipv4.ip_forward=0"], check=True, timeout=30)
        for rule in network_policy_rules():
            subprocess.run(["ip", "netns", "exec", px, "iptables", *rule], check=True, capture_output=True, timeout=30)
        _write_netns_files(sb, f"{PROXY_IP} egress-proxy")
        _write_netns_files(rn, f"{PROXY_RUNNER_SIDE_IP} egress-proxy")
        _write_netns_files(px, f"{UPSTREAM_IP} {UPSTREAM_HOST}")
        _write_netns_files(up, f"{UPSTREAM_IP} {UPSTREAM_HOST}")
        yield Topology(sb, rn, px, up, workdir, f"sk-ant-egress-{secrets.token_urlsafe(24)}", make_pki(workdir))
    finally:
        for netns in names.values():
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        if made_etc_netns:
            with contextlib.suppress(OSError):  # another run may be using it: then it stays
                Path("/etc/netns").rmdir()
        shutil.rmtree(workdir, ignore_errors=True)


class Processes:
    """Processes a fixture started (each in its own session); all ended at teardown."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        self.started.append(process)
        return process

    def stop(self) -> None:
        for process in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.started:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def wait_for_port(netns: str, address: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    def connects() -> bool:
        with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=0.5):
            return True
        return False

    deadline = time.monotonic() + 30
    while not in_netns(netns, connects):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{address}:{port} in {netns} did not open:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def upstream(topology: Topology) -> Iterator[Upstream]:
    processes = Processes()
    stand_in = Upstream(topology.workdir / "upstream-requests.jsonl", topology.workdir / "release")
    log = topology.workdir / "upstream.log"
    env = {**os.environ, "EGRESS_TEST_RECORD": str(stand_in.record), "EGRESS_TEST_RELEASE": str(stand_in.release),
           "EGRESS_TEST_ENVIRONMENT_KEY": ENVIRONMENT_KEY}
    try:
        process = processes.start(
            ["ip", "netns", "exec", topology.upstream, sys.executable, "-m", "uvicorn", "--factory",
             "tests.system.test_egress_proxy:upstream_app", "--host", UPSTREAM_IP, "--port", "443", "--log-level", "warning",
             "--ssl-certfile", str(topology.pki.cert), "--ssl-keyfile", str(topology.pki.key)],
            log, cwd=ROOT, env=env)
        wait_for_port(topology.upstream, UPSTREAM_IP, 443, process, log)
        yield stand_in
    finally:
        processes.stop()


def start_proxy(topology: Topology, processes: Processes, name: str, ca_file: Path, port: int, health_port: int,
                runner_port: int) -> None:
    """The project's entrypoint.sh, as the proxy's own uid, in the proxy netns."""
    private = topology.workdir / name
    private.mkdir(mode=0o700)
    key_file = private / "api-key"
    key_file.write_text(topology.real_key + "\n")  # a Secret's file may end in a newline
    key_file.chmod(0o400)
    for path in (private, key_file):
        os.chown(path, PROXY_UID, PROXY_UID)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "EGRESS_UPSTREAM_HOST": UPSTREAM_HOST, "EGRESS_UPSTREAM_PORT": "443",
           "EGRESS_CA_FILE": str(ca_file), "EGRESS_KEY_FILE": str(key_file), "EGRESS_RUN_DIR": str(private / "run"),
           "EGRESS_PORT": str(port), "EGRESS_HEALTH_PORT": str(health_port), "EGRESS_RUNNER_PORT": str(runner_port)}
    log = topology.workdir / f"{name}.log"
    log.touch()
    # nginx reopens /dev/stdout (its access log): in a pod that is a pipe runc gave the
    # container's user; here it is this file, so it is the proxy user's too.
    os.chown(log, PROXY_UID, PROXY_UID)
    process = processes.start(
        ["ip", "netns", "exec", topology.proxy, "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}",
         "--clear-groups", "--", "/bin/sh", str(PROXY_DIR / "entrypoint.sh")], log, env=env)
    wait_for_port(topology.proxy, PROXY_IP, health_port, process, log)


@pytest.fixture(scope="module")
def proxy(topology: Topology, upstream: Upstream) -> Iterator[None]:
    processes = Processes()
    try:
        start_proxy(topology, processes, "proxy", topology.pki.ca, PROXY_PORT, HEALTH_PORT, RUNNER_PORT)
        start_proxy(topology, processes, "untrusting-proxy", topology.pki.other_ca, UNTRUSTING_PORT,
                    UNTRUSTING_HEALTH_PORT, UNTRUSTING_RUNNER_PORT)
        yield
    finally:
        processes.stop()


def raw_request(request: bytes, port: int = PROXY_PORT, address: str = PROXY_IP) -> int:
    """Send bytes as they are (no client normalises the path or the Host); the status."""
    with socket.create_connection((address, port), timeout=10) as conn:
        conn.sendall(request)
        status_line = conn.makefile("rb").readline().decode()
    return int(status_line.split()[1])


def sandbox_client() -> httpx.Client:
    """What the agent does: the placeholder in both credential headers, the proxy by name."""
    return httpx.Client(base_url=f"http://{PROXY_IP}:{PROXY_PORT}", timeout=10,
                        headers={"host": "egress-proxy:8080", "x-api-key": PLACEHOLDER,
                                 "authorization": f"Bearer {PLACEHOLDER}"})


def runner_client(token: str) -> httpx.Client:
    """What a Managed Agents tool runner does: its work item's sessions token as the Bearer
    credential (the SDK sends no x-api-key then; this sends the placeholder anyway)."""
    return httpx.Client(base_url=f"http://{PROXY_RUNNER_SIDE_IP}:{RUNNER_PORT}", timeout=10,
                        headers={"host": f"egress-proxy:{RUNNER_PORT}", "authorization": f"Bearer {token}",
                                 "x-api-key": PLACEHOLDER})


def template_env() -> dict[str, str]:
    """The agent container's environment in the pod template the gateway uses."""
    template = yaml.safe_load(POD_TEMPLATE.read_text())
    (server,) = [c for c in template["spec"]["containers"] if c["name"] == "server"]
    return {e["name"]: e["value"] for e in server["env"]}


PLACEHOLDER = template_env()["ANTHROPIC_API_KEY"] if POD_TEMPLATE.exists() else "placeholder"


# --- the tests -------------------------------------------------------------------------------

def test_each_namespace_reaches_only_its_port_as_the_rendered_policies_say(topology, proxy):
    """The rendered NetworkPolicies let an agent pod open the key port only and a runner pod
    the runner port only (never health, which only the kubelet probes); the proxy netns
    enforces that, and neither namespace has a way to the upstream."""
    assert policy_reach() == {"agent": {"http"}, "runner": {"runner"}}

    def probe(address: str) -> Callable[[], dict[Any, Any]]:
        def run() -> dict[Any, Any]:
            found: dict[Any, Any] = {}
            for target in [*((address, port) for instance in PROXY_INSTANCES for port in instance.values()),
                           (UPSTREAM_IP, 443), (PROXY_UPSTREAM_SIDE_IP, 443)]:
                try:
                    socket.create_connection(target, timeout=3).close()
                    found[target[1] if target[0] == address else target[0]] = "connected"
                except OSError as exc:
                    found[target[1] if target[0] == address else target[0]] = errno.errorcode[exc.errno or 0]
            return found
        return run

    refused, unreachable = "ECONNREFUSED", "ENETUNREACH"
    assert in_netns(topology.sandbox, probe(PROXY_IP)) == {
        PROXY_PORT: "connected", HEALTH_PORT: refused, RUNNER_PORT: refused,
        UNTRUSTING_PORT: "connected", UNTRUSTING_HEALTH_PORT: refused, UNTRUSTING_RUNNER_PORT: refused,
        UPSTREAM_IP: unreachable, PROXY_UPSTREAM_SIDE_IP: unreachable}
    assert in_netns(topology.runner, probe(PROXY_RUNNER_SIDE_IP)) == {
        PROXY_PORT: refused, HEALTH_PORT: refused, RUNNER_PORT: "connected",
        UNTRUSTING_PORT: refused, UNTRUSTING_HEALTH_PORT: refused, UNTRUSTING_RUNNER_PORT: "connected",
        UPSTREAM_IP: unreachable, PROXY_UPSTREAM_SIDE_IP: unreachable}


def test_the_upstream_sees_the_real_key_and_never_the_placeholder(topology, upstream, proxy):
    def call() -> int:
        with sandbox_client() as client:
            return client.post("/v1/messages/count_tokens", json={"messages": []},
                               headers={"x-test-id": "key"}).status_code

    assert in_netns(topology.sandbox, call) == 200
    (seen,) = upstream.requests_tagged("key")
    headers = seen["headers"]
    assert [v for k, v in headers if k == "x-api-key"] == [topology.real_key]
    assert [v for k, v in headers if k == "authorization"] == []
    assert [v for k, v in headers if k == "host"] == [UPSTREAM_HOST]
    assert PLACEHOLDER not in json.dumps(upstream.requests())


def send_raw(requests: dict[str, bytes], port: int = PROXY_PORT, address: str = PROXY_IP) -> dict[str, tuple[int, bytes]]:
    """Each request on its own connection, as bytes (no client normalises the request line):
    each answer's status and whole response."""
    answers = {}
    for name, data in requests.items():
        with socket.create_connection((address, port), timeout=10) as conn:
            conn.sendall(data)
            reply = conn.makefile("rb").read()
        answers[name] = (int(reply.split()[1]), reply)
    return answers


def test_other_hosts_are_refused(topology, upstream, proxy):
    requests = {
        "other host": b"POST /v1/messages HTTP/1.1\r\nHost: api.anthropic.com\r\nx-test-id: refused\r\n\r\n",
        "absolute URL": b"POST https://example.org/v1/messages HTTP/1.1\r\nHost: egress-proxy\r\nx-test-id: refused\r\n\r\n",
        "no host": b"POST /v1/messages HTTP/1.0\r\nx-test-id: refused\r\n\r\n",
    }
    statuses = in_netns(topology.sandbox, lambda: {name: raw_request(data) for name, data in requests.items()})
    assert statuses == {"other host": 421, "absolute URL": 421, "no host": 421}
    assert upstream.requests_tagged("refused") == []


MODEL_CALLS = [("POST", "/v1/messages?beta=true"), ("POST", "/v1/messages/count_tokens?beta=true"),
               ("POST", "/v1/messages"), ("POST", "/v1/messages/count_tokens")]
NOT_MODEL_CALLS = [
    # other methods on the model paths
    "GET /v1/messages", "PUT /v1/messages", "DELETE /v1/messages", "PATCH /v1/messages", "OPTIONS /v1/messages",
    "HEAD /v1/messages", "GET /v1/messages/count_tokens",
    # the rest of the API, which the key would open
    "GET /v1/models", "POST /v1/files", "GET /v1/files/file_01/content", "POST /v1/messages/batches",
    "GET /v1/messages/batches/msgbatch_01/results", "POST /v1/complete", "POST /v1/sessions", "POST /v1/agents",
    "POST /v1/skills", "GET /v1/organizations/me", "POST /api/oauth/token", "GET /",
    # a runner's calls and the orchestrator's: the runner port's, with a runner's own token
    "GET /v1/sessions/sesn_01", "POST /v1/sessions/sesn_01/events", "GET /v1/sessions/sesn_01/events/stream",
    "POST /v1/environments/env_01/work/work_01/heartbeat", "GET /v1/environments/env_01/work/poll",
    "POST /v1/environments/env_01/work/work_01/ack",
    # paths that a server could read as another one, or as the model call they look like
    "POST /x/%2e%2e/v1/files", "POST /x/%2E%2E/v1/messages", "POST /v1/messages/%2e%2e/files",
    "POST /v1/messages/../files", "POST /v1/../v1/files", "POST /v1/./messages", "POST /./v1/messages",
    "POST /v1/messages/./count_tokens", "POST //v1/messages", "POST /v1//messages", "POST /v1/messages//count_tokens",
    "POST /v1/messages%2fcount_tokens", "POST /v1/messages%2F..%2Ffiles", "POST /v1/%6dessages", "POST /V1/MESSAGES",
    "POST /v1/messages/", "POST /v1/messages/count_tokens/x", "POST /v1/messagesx", "POST /v1/messages;x",
    "POST /v1/messages%3Fbeta=true", "POST /v1/messages%00", "POST /v1/messages\\..\\files",
    "POST http://egress-proxy/v1/files", "POST * ",
]


def test_the_key_port_forwards_the_model_calls_only(topology, upstream, proxy):
    """The two model calls (any query string) reach the upstream with the key. Every other
    request line, sent as bytes, is answered by the proxy itself: the stand-in, which records
    every request it gets, gets none of them, and no answer carries the key."""

    def request(line: str, tag: str) -> bytes:
        body = b'{"model": "claude-test", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}'
        return (f"{line} HTTP/1.1\r\nHost: egress-proxy\r\nx-api-key: {PLACEHOLDER}\r\nx-test-id: {tag}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body

    before = len(upstream.requests())
    refused = in_netns(topology.sandbox, lambda: send_raw({line: request(line, "not-a-model-call")
                                                           for line in NOT_MODEL_CALLS}))
    assert [(r["method"], r["path"]) for r in upstream.requests()[before:]] == []
    assert {line: status for line, (status, _) in refused.items() if status not in (400, 404)} == {}
    detail = {"detail": "the key port forwards only POST /v1/messages and POST /v1/messages/count_tokens"}
    assert json.loads(refused["POST /v1/files"][1].split(b"\r\n\r\n", 1)[1]) == detail
    assert sum(status == 404 for status, _ in refused.values()) >= 15  # refused by the rule, not only by nginx's parser
    assert not [line for line, (_, reply) in refused.items() if topology.real_key.encode() in reply]

    allowed = in_netns(topology.sandbox, lambda: send_raw({f"{m} {p}": request(f"{m} {p}", f"model {p}")
                                                          for m, p in MODEL_CALLS}))
    assert {line: status for line, (status, _) in allowed.items()} == {f"{m} {p}": 200 for m, p in MODEL_CALLS}
    assert not [line for line, (_, reply) in allowed.items() if topology.real_key.encode() in reply]
    for method, path in MODEL_CALLS:
        (seen,) = upstream.requests_tagged(f"model {path}")
        assert (seen["method"], seen["path"]) == (method, path.split("?")[0])
        assert [v for k, v in seen["headers"] if k == "x-api-key"] == [topology.real_key]
    assert topology.real_key not in (topology.workdir / "proxy.log").read_text()


# Every call anthropic 2.14.0's EnvironmentWorker.handle_item makes (the runner in an agent pod).
RUNNER_CALLS = [
    ("POST", "/v1/environments/env_01/work/work_01/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"),
    ("POST", "/v1/environments/env_01/work/work_01/stop"),
    ("GET", "/v1/sessions/sesn_01"),
    ("GET", "/v1/sessions/sesn_01/events?limit=1000"),
    ("POST", "/v1/sessions/sesn_01/events"),
    ("GET", "/v1/sessions/sesn_01/events/stream"),
    ("GET", "/v1/skills/skill_01/versions/latest"),
    ("GET", "/v1/skills/skill_01/versions/1759178010641129/content"),
    ("GET", "/v1/memory_stores/memstore_01/memories?view=full"),
    ("POST", "/v1/memory_stores/memstore_01/memories"),
    ("GET", "/v1/memory_stores/memstore_01/memories/mem_01"),
    ("POST", "/v1/memory_stores/memstore_01/memories/mem_01"),
    ("DELETE", "/v1/memory_stores/memstore_01/memories/mem_01"),
]


def test_the_runner_port_passes_the_runners_own_token_and_never_the_key(topology, upstream, proxy):
    """Each of the runner's calls reaches the upstream with exactly the Authorization it
    was sent with, no x-api-key (the placeholder dropped, the real key never added), the
    path and query as sent; and neither the token nor the key is logged."""
    token = f"sst_{secrets.token_urlsafe(24)}"

    def call() -> list[int]:
        with runner_client(token) as client:
            return [client.request(method, path, headers={"x-test-id": f"runner {method} {path}"}).status_code
                    for method, path in RUNNER_CALLS]

    statuses = in_netns(topology.runner, call)
    assert 421 not in statuses and 502 not in statuses, statuses
    for method, path in RUNNER_CALLS:
        (seen,) = upstream.requests_tagged(f"runner {method} {path}")
        headers = seen["headers"]
        assert seen["path"] == path.split("?")[0]
        assert [v for k, v in headers if k == "authorization"] == [f"Bearer {token}"]
        assert [v for k, v in headers if k == "x-api-key"] == []
        assert [v for k, v in headers if k == "host"] == [UPSTREAM_HOST]
    records = json.dumps([upstream.requests_tagged(f"runner {m} {p}") for m, p in RUNNER_CALLS])
    assert topology.real_key not in records and PLACEHOLDER not in records
    log = (topology.workdir / "proxy.log").read_text()
    assert "/v1/sessions/sesn_01/events" in log  # the access log is this file
    assert token not in log and topology.real_key not in log and "expected_last_heartbeat" not in log


def test_the_runner_port_refuses_everything_else_and_sends_nothing(topology, upstream, proxy):
    """Not a runner's call, not the proxy's name, or a path that could mean another one
    upstream: refused on the runner port (404 JSON or 421), and nothing reaches the upstream."""

    def request(line: str, host: str = "egress-proxy") -> bytes:
        return (f"{line} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer sst_refused\r\n"
                "x-test-id: runner-refused\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").encode()

    requests = {
        "messages": request("POST /v1/messages"),
        "models": request("GET /v1/models"),
        "poll (the environment key's)": request("GET /v1/environments/env_01/work/poll?block_ms=999"),
        "ack (the orchestrator's)": request("POST /v1/environments/env_01/work/work_01/ack"),
        "create a session": request("POST /v1/sessions"),
        "delete a session": request("DELETE /v1/sessions/sesn_01"),
        "another method": request("PUT /v1/sessions/sesn_01/events"),
        "upload a skill": request("POST /v1/skills/skill_01/versions"),
        "encoded slash": request("GET /v1/sessions/sesn_01%2F..%2F..%2Fmessages"),
        "encoded id": request("GET /v1/sessions/%73esn_01"),
        "dot segments": request("GET /v1/sessions/../messages"),
        "trailing path": request("GET /v1/sessions/sesn_01/events/stream/more"),
        "outside /v1/": request("GET /local/requests"),
        "other host": request("GET /v1/sessions/sesn_01", host="api.anthropic.com"),
        "absolute URL": request("GET https://example.org/v1/sessions/sesn_01"),
    }

    answers = in_netns(topology.runner, lambda: send_raw(requests, RUNNER_PORT, PROXY_RUNNER_SIDE_IP))
    refused = {name: status for name, (status, _) in answers.items()}
    assert refused == {name: 421 if name in ("other host", "absolute URL") else 404 for name in requests}
    assert json.loads(answers["messages"][1].split(b"\r\n\r\n", 1)[1]) == {
        "detail": "the runner port forwards only the calls of a Managed Agents runner"}
    assert upstream.requests_tagged("runner-refused") == []
    # The same request, for a runner's call, goes through: the refusals above are the rules.
    allowed = request("GET /v1/sessions/sesn_01").replace(b"runner-refused", b"runner-allowed")
    assert in_netns(topology.runner, lambda: raw_request(allowed, RUNNER_PORT, PROXY_RUNNER_SIDE_IP)) == 404
    assert len(upstream.requests_tagged("runner-allowed")) == 1


@pytest.mark.parametrize("port", [PROXY_PORT, RUNNER_PORT])
def test_server_sent_events_are_not_buffered(topology, upstream, proxy, port):
    """The upstream holds its last event until the client has read the first, so the first
    must cross the proxy while the response is still open; a proxy that held responses
    back would leave the client waiting until the read timed out."""
    upstream.release.unlink(missing_ok=True)

    def stream() -> list[str]:
        events = []
        client = sandbox_client() if port == PROXY_PORT else runner_client("sst_stream")
        method, path = STREAM_CALLS[port]
        with client, client.stream(method, path, headers={"x-test-id": f"sse-{port}", "x-test-stream": "hold"}) as response:
            for line in response.iter_lines():
                if line.startswith("event:"):
                    events.append(line.split(":", 1)[1].strip())
                    if events == ["first"]:
                        upstream.release.touch()
        return events

    assert in_netns(topology.sandbox if port == PROXY_PORT else topology.runner, stream) == ["first", "last"]


def test_the_proxy_verifies_the_upstreams_certificate(topology, upstream, proxy):
    """A proxy that trusts another CA refuses the stand-in's certificate on both ports: nothing is sent."""

    def call(method: str, url: str, **kwargs: Any) -> Callable[[], int]:
        def run() -> int:
            with httpx.Client(timeout=10, headers={"host": "egress-proxy", "x-test-id": "untrusted"}) as client:
                return client.request(method, url, **kwargs).status_code
        return run

    model = call("POST", f"http://{PROXY_IP}:{UNTRUSTING_PORT}/v1/messages/count_tokens", json={"messages": []})
    runner = call("GET", f"http://{PROXY_RUNNER_SIDE_IP}:{UNTRUSTING_RUNNER_PORT}/v1/sessions/sesn_untrusted",
                  headers={"authorization": "Bearer sst_untrusted"})
    assert (in_netns(topology.sandbox, model), in_netns(topology.runner, runner)) == (502, 502)
    assert upstream.requests_tagged("untrusted") == []


def test_a_bad_key_stops_the_proxy_with_a_clear_message_and_writes_nothing(tmp_path):
    for bad in ('sk-ant-"; proxy_pass http://evil', "", "sk ant"):
        key_file = tmp_path / "api-key"
        key_file.write_text(bad)
        run_dir = tmp_path / "run"
        proc = subprocess.run(["/bin/sh", str(PROXY_DIR / "entrypoint.sh")], capture_output=True, text=True, timeout=30,
                              env={"PATH": "/usr/sbin:/usr/bin:/bin", "EGRESS_KEY_FILE": str(key_file),
                                   "EGRESS_RUN_DIR": str(run_dir)})
        assert proc.returncode == 2
        assert "the key in" in proc.stderr and "[A-Za-z0-9_-]" in proc.stderr
        assert not bad or bad not in proc.stderr
        assert not run_dir.exists()
    bad_host = subprocess.run(["/bin/sh", str(PROXY_DIR / "entrypoint.sh")], capture_output=True, text=True, timeout=30,
                              env={"PATH": "/usr/bin:/bin", "EGRESS_UPSTREAM_HOST": "evil;}", "EGRESS_RUN_DIR": str(run_dir)})
    assert bad_host.returncode == 2 and "EGRESS_UPSTREAM_HOST" in bad_host.stderr and not run_dir.exists()


@pytest.mark.e2e
def test_the_real_cli_makes_a_turn_through_the_proxy_and_the_sandbox_holds_no_key(topology, upstream, proxy):
    """The agent (real SDK, real bundled CLI) in the sandbox netns, with the pod template's
    environment and the agent's uid: its turn reaches the local model through the proxy."""
    home = topology.workdir / "sandbox-home"
    home.mkdir()
    os.chown(home, SANDBOX_UID, SANDBOX_UID)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "LANG": "C.UTF-8", **template_env(),
           "HOME": str(home), "TMPDIR": str(home), "AGENT_DATA_DIR": str(home / "data"), "CLAUDE_CODE_MAX_RETRIES": "0"}
    assert env["ANTHROPIC_BASE_URL"] == "http://egress-proxy:8080"
    sandbox = ["ip", "netns", "exec", topology.sandbox, "setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}",
               "--clear-groups", "--"]
    key_file = topology.workdir / "proxy" / "api-key"
    probe = ("import json, os, sys; key = sys.argv[1]\n"
             "try:\n    open(sys.argv[2]).read(); readable = True\nexcept OSError:\n    readable = False\n"
             "print(json.dumps({'in_env': any(key in v for v in os.environ.values()), 'key_file_readable': readable}))")
    seen = subprocess.run([*sandbox, sys.executable, "-c", probe, topology.real_key, str(key_file)], env=env, cwd=home,
                          capture_output=True, text=True, timeout=60)
    assert json.loads(seen.stdout) == {"in_env": False, "key_file_readable": False}, seen.stderr

    before = len(upstream.requests())
    proxy_log = topology.workdir / "proxy.log"
    log_before = len(proxy_log.read_text().splitlines())
    turn = subprocess.run([*sandbox, sys.executable, "-m", "hosting.run_once"], cwd=ROOT, capture_output=True, text=True,
                          timeout=180, env={**env, "PROMPT": "What do otters eat?"})
    assert turn.returncode == 0, turn.stderr
    assert turn.stdout.startswith("Local model answer to: What do otters eat?")
    # Everything the CLI asked the key port for was a model call, and forwarded: the allowlist
    # leaves out nothing the CLI needs (the access log has no query string: "$request_method $uri").
    asked = [line.split('"')[1:3] for line in proxy_log.read_text().splitlines()[log_before:]
             if line.startswith(f"{SANDBOX_IP} ")]
    assert asked and {(request, status.split()[0]) for request, status in asked} <= {
        ("POST /v1/messages", "200"), ("POST /v1/messages/count_tokens", "200")}, asked
    messages = [r for r in upstream.requests()[before:] if r["path"] == "/v1/messages"]
    assert messages, "the turn did not reach the upstream"
    for request in messages:
        assert [v for k, v in request["headers"] if k == "x-api-key"] == [topology.real_key]
        assert not [v for k, v in request["headers"] if k == "authorization"]
    assert PLACEHOLDER not in json.dumps(upstream.requests())


@pytest.mark.e2e
def test_the_real_runner_serves_its_work_item_through_the_runner_port(topology, upstream, proxy):
    """hosting/environments/runner.py (the anthropic SDK's EnvironmentWorker) in the sandbox
    netns, as the agent's uid, with only its work item's secret and the runner port as its
    API: it heartbeats, reads the session, streams its events, runs the tool, sends the
    result and stops the item, every call with its own token; the key never reaches it."""
    ca = str(topology.pki.ca)

    def control(method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        import ssl

        context = ssl.create_default_context(cafile=ca)
        context.check_hostname = False  # the orchestrator's side, by address: no resolver in this netns
        with httpx.Client(base_url=f"https://{UPSTREAM_IP}", verify=context, timeout=10) as client:
            return client.request(method, path, **kwargs).raise_for_status().json()

    item = in_netns(topology.upstream, lambda: control("POST", "/test/environments/sessions",
                                                       json=[["bash", {"command": "echo through the runner port"}]]))
    home = topology.workdir / "runner-home"
    home.mkdir()
    os.chown(home, SANDBOX_UID, SANDBOX_UID)
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(home),
           "AGENT_DATA_DIR": str(home / "data"), "AGENT_RUNNER_MAX_IDLE_SECONDS": "1",
           "ANTHROPIC_BASE_URL": f"http://egress-proxy:{RUNNER_PORT}", "ANTHROPIC_ENVIRONMENT_ID": item["environment_id"],
           "ANTHROPIC_WORK_ID": item["work_id"], "ANTHROPIC_SESSION_ID": item["session_id"],
           "ANTHROPIC_WORK_SECRET": item["secret"]}
    before = len(upstream.requests())
    runner = subprocess.run(["ip", "netns", "exec", topology.runner, "setpriv", f"--reuid={SANDBOX_UID}",
                             f"--regid={SANDBOX_UID}", "--clear-groups", "--", sys.executable, "-m",
                             "hosting.environments.runner", "run"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    log = home / "data" / "environment" / "runner.log"
    assert runner.returncode == 0, runner.stderr + (log.read_text() if log.exists() else "")
    done = in_netns(topology.upstream, lambda: control("GET", f"/test/environments/sessions/{item['session_id']}"))
    assert done == {"results": [["bash", False, "through the runner port"]], "item_state": "stopped", "unexpected": [],
                    "credentials": [f"sessions_token:{item['work_id']}"]}
    token = f"Bearer {json.loads(base64.urlsafe_b64decode(item['secret'] + '==='))['sessions_token']}"
    sent = [r for r in upstream.requests()[before:] if not r["path"].startswith("/test/")]
    assert {r["path"] for r in sent} >= {f"/v1/sessions/{item['session_id']}/events/stream",
                                         f"/v1/environments/{item['environment_id']}/work/{item['work_id']}/stop"}
    for request in sent:
        assert [v for k, v in request["headers"] if k == "authorization"] == [token]
        assert [v for k, v in request["headers"] if k == "x-api-key"] == []
    assert topology.real_key not in json.dumps(sent) and ENVIRONMENT_KEY not in json.dumps(sent)


@pytest.mark.docker
def test_the_proxy_image_runs_as_the_pod_runs_it(tmp_path):
    """The image (hosting/kubernetes/egress-proxy/Dockerfile) with the pod's restrictions:
    its uid, a read-only root with /tmp the only writable place, no capability, no new
    privileges; the ConfigMap's files and the key mounted read-only. No network: the API's
    name points at the container's own loopback, where nothing answers (so 502)."""
    from tests.support.images import BASE_IMAGE, docker

    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker engine: run scripts/start-dockerd.sh as root")
    subprocess.run([str(ROOT / "hosting/docker/build-base-image.sh"), BASE_IMAGE], check=True, timeout=900)
    image = "research-agent-egress-proxy:test"
    docker("build", "-q", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", image, str(PROXY_DIR),
           timeout=900)
    key_dir = tmp_path / "key"
    key_dir.mkdir()
    (key_dir / "api-key").write_text("sk-ant-image-test\n")
    (key_dir / "api-key").chmod(0o400)
    os.chown(key_dir / "api-key", PROXY_UID, PROXY_UID)
    name = f"proxy-egress-image-test-{uuid.uuid4().hex[:8]}"
    try:
        docker("run", "-d", "--name", name, "--network", "none", "--add-host", "api.anthropic.com:127.0.0.1",
               "--read-only", "--tmpfs", "/tmp:size=16m", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
               "--user", f"{PROXY_UID}:{PROXY_UID}", "-v", f"{PROXY_DIR}:/etc/egress-proxy:ro",
               "-v", f"{key_dir}:/etc/egress-proxy-key:ro", image)

        def ask(port: int, request: str) -> str:
            script = f'exec 3<>/dev/tcp/127.0.0.1/{port}; printf "{request}" >&3; head -n1 <&3'
            return docker("exec", name, "bash", "-c", script, check=False).stdout.strip()

        deadline = time.monotonic() + 30
        while not ask(HEALTH_PORT, "GET /healthz HTTP/1.0\\r\\n\\r\\n").endswith("200 OK"):
            state = json.loads(docker("inspect", name).stdout)[0]["State"]
            if not state["Running"] or time.monotonic() > deadline:
                raise AssertionError(f"the proxy did not start:\n{docker('logs', name, check=False).stderr}")
            time.sleep(0.2)
        model_call = "POST /v1/messages HTTP/1.1\\r\\nContent-Length: 0\\r\\nHost: "
        assert ask(PROXY_PORT, model_call + "egress-proxy\\r\\n\\r\\n").split()[1] == "502"
        assert ask(PROXY_PORT, model_call + "example.org\\r\\n\\r\\n").split()[1] == "421"
        assert ask(PROXY_PORT, "GET /v1/models HTTP/1.1\\r\\nHost: egress-proxy\\r\\n\\r\\n").split()[1] == "404"
        assert ask(RUNNER_PORT, "GET /v1/sessions/sesn_01 HTTP/1.1\\r\\nHost: egress-proxy\\r\\n\\r\\n").split()[1] == "502"
        assert ask(RUNNER_PORT, "GET /v1/models HTTP/1.1\\r\\nHost: egress-proxy\\r\\n\\r\\n").split()[1] == "404"
        assert docker("exec", name, "id", "-u").stdout.strip() == str(PROXY_UID)
        assert "sk-ant-image-test" not in docker("logs", name).stdout + docker("logs", name).stderr
    finally:
        docker("rm", "-f", name, check=False)
