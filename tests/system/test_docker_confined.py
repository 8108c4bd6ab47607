"""Tier 3 confined on one Docker host: ``hosting/docker/gateway-compose.yml``, brought up by
docker-compose itself, on the real engine.

The compose file runs the gateway, the egress proxy and Redis; the gateway starts its
sandboxes on the internal network. A test override adds only the stand-in for the
Anthropic API: the project's local model, served over TLS with a CA made here (the proxy
trusts it through ``EGRESS_CA_FILE``), on the proxy's outside network under the name
``api.anthropic.test``. The host talks only to the gateway's port on 127.0.0.1; every other
probe runs inside a container (``docker exec``), by name, on networks this test made.
Everything (the project, its sandboxes and their volumes) is removed at the end, also when
a test fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
import yaml

from harness.processes import free_port
from tests.support import ROOT
from tests.support.images import BASE_IMAGE, docker
from tests.support.polling import wait_for
from tests.support.turns import post_turn

DEPLOYED = [pytest.mark.docker, pytest.mark.e2e,
            pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs docker-compose"),
            pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the key file is handed to the proxy's uid")]
"""The marks of every test of the deployment (the settings' unit tests at the end need none)."""


def deployed(test: Any) -> Any:
    for mark in DEPLOYED:
        test = mark(test)
    return test

COMPOSE_FILE = ROOT / "hosting/docker/gateway-compose.yml"
AGENT_IMAGE = "confined-agent:test"
"""The product image from this tree, under a tag of its own (other runs rebuild ``research-agent:test``
from their trees); its layers come from the same cache."""
PROXY_IMAGE = "research-agent-egress-proxy:test"  # built as tests/system/test_egress_proxy.py builds it
REDIS_IMAGE = "confined-redis:test"
UPSTREAM_HOST, UPSTREAM_PORT = "api.anthropic.test", 8443
TOKEN, ADMIN = f"confined-{secrets.token_hex(12)}", f"confined-admin-{secrets.token_hex(12)}"
RECALL = "What value did I ask you to remember?"
# A probe run inside a container: connect to host:port, print what happened.
CONNECT = ("import socket, sys\n"
           "try:\n"
           "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()\n"
           "    print('connected')\n"
           "except socket.gaierror:\n"
           "    print('unresolved')\n"
           "except OSError as exc:\n"
           "    print('refused', exc.errno)\n")


@dataclass
class Deployment:
    project: str
    env: dict[str, str]
    url: str
    key: str
    network: str
    installation: str

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["docker-compose", "-p", self.project, "-f", str(COMPOSE_FILE),
                               "-f", self.env["CONFINED_OVERRIDE"], *args],
                              capture_output=True, text=True, timeout=timeout, env=self.env)
        if proc.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def sandboxes(self) -> list[str]:
        return docker("ps", "-q", "--filter", f"label=research-agent.installation={self.installation}").stdout.split()

    def logs(self) -> str:
        return self.compose("logs", "--no-color", "--tail", "80").stdout


def inspect(container: str) -> dict[str, Any]:
    (attrs,) = json.loads(docker("inspect", container).stdout)
    return attrs  # type: ignore[no-any-return]


def python_in(container: str, code: str, *args: str) -> str:
    # A name nothing answers for waits out the resolver's retries: one try of one second each.
    return docker("exec", "-e", "RES_OPTIONS=timeout:1 attempts:1", container, "python3", "-c", code,
                  *args).stdout.strip()


def _build_images() -> None:
    """The three images, as the compose file's ``build:`` sections make them, on the offline base."""
    subprocess.run([str(ROOT / "hosting/docker/build-base-image.sh"), BASE_IMAGE], check=True, timeout=900)
    base = f"BASE_IMAGE={BASE_IMAGE}"
    docker("build", "-q", "--network", "host", "-f", "hosting/Dockerfile", "--build-arg", base, "-t", AGENT_IMAGE,
           str(ROOT), timeout=900)
    docker("build", "-q", "--network", "host", "--build-arg", base, "-t", PROXY_IMAGE,
           str(ROOT / "hosting/kubernetes/egress-proxy"), timeout=900)
    docker("build", "-q", "--network", "host", "--build-arg", base, "-t", REDIS_IMAGE, str(ROOT / "hosting/docker/redis"),
           timeout=900)


def _override(workdir: Path) -> Path:
    """The stand-in for the Anthropic API, and the proxy's trust in its CA: all the test adds."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    leaf = ca.issue_cert(UPSTREAM_HOST)
    leaf.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))
    for pem in leaf.cert_chain_pems[1:]:
        pem.write_to_path(str(workdir / "cert.pem"), append=True)
    leaf.private_key_pem.write_to_path(str(workdir / "key.pem"))
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (workdir / name).chmod(0o644)  # read by the containers' users; a throwaway test CA
    override = {"services": {
        "egress-proxy": {
            "environment": {"EGRESS_CA_FILE": "/etc/test-ca/ca.pem"},
            "depends_on": ["model-api"],  # nginx resolves its upstream once, at start
            "volumes": [f"{workdir / 'ca.pem'}:/etc/test-ca/ca.pem:ro"],
        },
        "model-api": {
            "image": AGENT_IMAGE,
            "entrypoint": ["python3", "-m", "uvicorn", "hosting.local_model.app:create_app", "--factory",
                           "--host", "0.0.0.0", "--port", str(UPSTREAM_PORT), "--log-level", "warning",
                           "--ssl-certfile", "/etc/test-tls/cert.pem", "--ssl-keyfile", "/etc/test-tls/key.pem"],
            "volumes": [f"{workdir / 'cert.pem'}:/etc/test-tls/cert.pem:ro",
                        f"{workdir / 'key.pem'}:/etc/test-tls/key.pem:ro"],
            "networks": {"egress": {"aliases": [UPSTREAM_HOST]}},
        },
    }}
    path = workdir / "override.yml"
    path.write_text(yaml.safe_dump(override))
    return path


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker engine: run scripts/start-dockerd.sh as root")
    _build_images()
    run = secrets.token_hex(4)
    workdir = Path(tempfile.mkdtemp(prefix="confined-"))
    workdir.chmod(0o755)
    key = f"sk-ant-confined-{secrets.token_urlsafe(24)}"
    key_file = workdir / "model-key"
    key_file.write_text(key)
    key_file.chmod(0o400)
    os.chown(key_file, 10002, 10002)  # the proxy's user, as the README's install command does
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "GATEWAY_", "CLAUDE_"))}
    port = free_port()
    env.update({
        "AGENT_IMAGE": AGENT_IMAGE, "EGRESS_PROXY_IMAGE": PROXY_IMAGE, "REDIS_IMAGE": REDIS_IMAGE,
        "GATEWAY_TENANTS": f"{TOKEN}:acme", "GATEWAY_ADMIN_TOKEN": ADMIN, "GATEWAY_PORT": str(port),
        "GATEWAY_WARM_POOL": "1", "GATEWAY_INSTALLATION": f"confined-{run}", "SANDBOX_NETWORK": f"confined-{run}-sandboxes",
        "REDIS_PASSWORD": secrets.token_hex(16), "DOCKER_GID": str(os.stat("/var/run/docker.sock").st_gid),
        "MODEL_KEY_FILE": str(key_file), "EGRESS_UPSTREAM_HOST": UPSTREAM_HOST,
        "EGRESS_UPSTREAM_PORT": str(UPSTREAM_PORT), "CONFINED_OVERRIDE": str(_override(workdir)),
    })
    deployed = Deployment(f"confined-{run}", env, f"http://127.0.0.1:{port}", key, env["SANDBOX_NETWORK"],
                          env["GATEWAY_INSTALLATION"])
    try:
        deployed.compose("up", "-d", "--no-build")
        try:
            wait_for(lambda: _pool_full(deployed), timeout=180, interval=0.5)
        except AssertionError:
            raise AssertionError(f"the deployment did not become ready:\n{deployed.logs()}") from None
        yield deployed
    finally:
        _tear_down(deployed)
        shutil.rmtree(workdir, ignore_errors=True)


def _pool_full(deployed: Deployment) -> bool:
    try:
        response = httpx.get(f"{deployed.url}/admin/pool", headers={"authorization": f"Bearer {ADMIN}"}, timeout=5)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.json().get("ready", 0) >= 1


def _tear_down(deployed: Deployment) -> None:
    """The gateway first (it would refill its pool), then its sandboxes and their volumes,
    then the rest; the sandbox network can go only once no sandbox is on it."""
    subprocess.run(["docker-compose", "-p", deployed.project, "-f", str(COMPOSE_FILE), "-f",
                    deployed.env["CONFINED_OVERRIDE"], "rm", "-sf", "gateway"],
                   capture_output=True, timeout=120, env=deployed.env)
    label = f"label=research-agent.installation={deployed.installation}"
    for _ in range(2):  # again if a create the gateway had asked for landed after the first pass
        containers = docker("ps", "-aq", "--filter", label, check=False).stdout.split()
        if containers:
            docker("rm", "-f", *containers, check=False)
        volumes = docker("volume", "ls", "-q", "--filter", label, check=False).stdout.split()
        if volumes:
            docker("volume", "rm", "-f", *volumes, check=False)
        subprocess.run(["docker-compose", "-p", deployed.project, "-f", str(COMPOSE_FILE), "-f",
                        deployed.env["CONFINED_OVERRIDE"], "down", "-v", "--remove-orphans", "-t", "5"],
                       capture_output=True, timeout=300, env=deployed.env)
        if docker("network", "inspect", deployed.network, check=False).returncode != 0:
            return


def routes(container: str) -> list[str]:
    """The container's IPv4 routes, read from its kernel: ``<network> via <gateway>`` or ``<network> on-link``."""
    def address(field: str) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(int(field, 16).to_bytes(4, "little"))

    found = []
    for line in docker("exec", container, "cat", "/proc/net/route").stdout.splitlines()[1:]:
        fields = line.split()
        network = ipaddress.IPv4Network(f"{address(fields[1])}/{address(fields[7])}")
        gateway = address(fields[2])
        found.append(f"{network} via {gateway}" if int(gateway) else f"{network} on-link")
    return found


def _project_containers(deployed: Deployment) -> dict[str, str]:
    """``{service: container id}`` of the compose project (the stand-in's included)."""
    return {service: deployed.container(service) for service in ("gateway", "egress-proxy", "redis", "model-api")}


def _sandbox(deployed: Deployment) -> str:
    (first, *_) = wait_for(deployed.sandboxes, timeout=60)
    return str(first)


@deployed
def test_a_turn_with_recall_through_the_gateways_published_port(deployment: Deployment) -> None:
    """The whole path: host → gateway (127.0.0.1) → sandbox by name → proxy → the model API."""
    headers = {"authorization": f"Bearer {TOKEN}"}
    value = secrets.token_hex(4)
    first = post_turn(deployment.url, "confined-recall", f"Remember this value: {value}", headers=headers)
    assert first.types[-1] == "done" and not first.of("error"), first.events
    second = post_turn(deployment.url, "confined-recall", RECALL, headers=headers)
    assert value in second.text, second.events
    route = httpx.get(f"{deployment.url}/admin/sessions/confined-recall",
                      headers={"authorization": f"Bearer {ADMIN}"}, timeout=10).json()
    assert route["address"] == f"http://agent-{route['sandbox_id']}:8000"  # by name, on the internal network


@deployed
def test_the_host_reaches_only_the_gateways_port_on_loopback(deployment: Deployment) -> None:
    published = {}
    for name, container in {**_project_containers(deployment), "sandbox": _sandbox(deployment)}.items():
        ports = inspect(container)["NetworkSettings"]["Ports"] or {}
        published[name] = {port: bindings for port, bindings in ports.items() if bindings}
    gateway = published.pop("gateway")
    assert [(b["HostIp"], b["HostPort"]) for b in gateway["8000/tcp"]] == [("127.0.0.1", deployment.url.rsplit(":")[-1])]
    assert list(gateway) == ["8000/tcp"]
    assert all(not ports for ports in published.values()), published


@deployed
def test_the_sandbox_network_is_internal_and_holds_only_gateway_proxy_and_sandboxes(deployment: Deployment) -> None:
    (network,) = json.loads(docker("network", "inspect", deployment.network).stdout)
    assert network["Internal"] is True
    containers = _project_containers(deployment)
    members = set(network["Containers"])
    assert {containers["gateway"], containers["egress-proxy"]} <= members
    others = members - {containers["gateway"], containers["egress-proxy"]}
    assert others and all(inspect(c)["Config"]["Labels"].get("research-agent.installation") == deployment.installation
                          for c in others)  # sandboxes only: not Redis, not the model API
    (store,) = json.loads(docker("network", "inspect", f"{deployment.project}_store").stdout)
    assert store["Internal"] is True and set(store["Containers"]) == {containers["gateway"], containers["redis"]}
    host_addresses = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    for internal in (network, store):  # the host has no foot on either
        assert internal["Options"].get("com.docker.network.bridge.inhibit_ipv4") == "true"
        ((gateway,),) = [[c["Gateway"]] for c in internal["IPAM"]["Config"]]
        assert f" {gateway}/" not in host_addresses


@deployed
def test_a_sandbox_has_no_default_route_no_published_port_and_no_key(deployment: Deployment) -> None:
    sandbox = _sandbox(deployment)
    attrs = inspect(sandbox)
    assert attrs["HostConfig"]["NetworkMode"] == deployment.network
    assert list(attrs["NetworkSettings"]["Networks"]) == [deployment.network]
    assert not attrs["HostConfig"]["PortBindings"]
    # The kernel's tables, read inside the sandbox: the internal network's subnet, and no IPv6.
    (network,) = json.loads(docker("network", "inspect", deployment.network).stdout)
    assert network["Options"].get("com.docker.network.bridge.inhibit_ipv4") == "true"
    ((subnet, gateway),) = [(c["Subnet"], c["Gateway"]) for c in network["IPAM"]["Config"]]
    # Docker before 26 sets a default route on an internal network too (moby/moby#46603):
    # the backend removes it before the sandbox serves (hosting/sandboxes/no_default_route.py).
    assert routes(sandbox) == [f"{subnet} on-link"]
    host_addresses = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    assert f" {gateway}/" not in host_addresses  # the host holds no address on this network
    members = [c["IPv4Address"].split("/")[0] for c in network["Containers"].values()]
    assert gateway not in members
    assert docker("exec", sandbox, "cat", "/proc/net/if_inet6").stdout == ""
    environ = docker("exec", sandbox, "cat", "/proc/1/environ").stdout.split("\0")
    assert "ANTHROPIC_API_KEY=placeholder-the-egress-proxy-sets-the-key" in environ
    assert "ANTHROPIC_BASE_URL=http://egress-proxy:8080" in environ
    assert deployment.key not in json.dumps(attrs) and not any(deployment.key in v for v in environ)
    assert not any(m["Source"].endswith("docker.sock") for m in attrs["Mounts"])
    assert deployment.env["REDIS_PASSWORD"] not in json.dumps(attrs)


@deployed
def test_the_model_is_reachable_from_a_sandbox_only_through_the_proxy(deployment: Deployment) -> None:
    sandbox = _sandbox(deployment)
    model = _project_containers(deployment)["model-api"]
    model_name = inspect(model)["Name"].lstrip("/")
    # By any of the model API's names, nothing: they do not resolve on the internal network.
    for host in (UPSTREAM_HOST, model_name, "redis"):
        assert python_in(sandbox, CONNECT, host, str(UPSTREAM_PORT if host != "redis" else 6379)) == "unresolved", host
    # Through the proxy's key port, by its name, a model call works with the placeholder key.
    reply = python_in(sandbox, "import json, urllib.request\n"
                      "body = json.dumps({'model': 'm', 'max_tokens': 64,"
                      " 'messages': [{'role': 'user', 'content': 'Remember this value: 7'}]}).encode()\n"
                      "request = urllib.request.Request('http://egress-proxy:8080/v1/messages', body,"
                      " {'content-type': 'application/json', 'x-api-key': 'placeholder',"
                      " 'anthropic-version': '2023-06-01'})\n"
                      "print(json.load(urllib.request.urlopen(request, timeout=30))['type'])\n")
    assert reply == "message"
    # The proxy's own way out is the outside network (its default route), not the sandboxes'.
    (egress,) = json.loads(docker("network", "inspect", f"{deployment.project}_egress").stdout)
    (egress_gateway,) = [c["Gateway"] for c in egress["IPAM"]["Config"]]
    proxy = _project_containers(deployment)["egress-proxy"]
    assert f"0.0.0.0/0 via {egress_gateway}" in routes(proxy)


@deployed
def test_the_key_is_only_in_the_proxy_container(deployment: Deployment) -> None:
    containers = _project_containers(deployment)
    proxy = containers.pop("egress-proxy")
    assert docker("exec", proxy, "cat", "/run/secrets/model-key").stdout == deployment.key
    assert deployment.key not in json.dumps(inspect(proxy))  # a mounted file, not configuration
    for name, container in {**containers, "sandbox": _sandbox(deployment)}.items():
        assert deployment.key not in json.dumps(inspect(container)), name
        environ = docker("exec", container, "cat", "/proc/1/environ").stdout
        assert deployment.key not in environ, name
        assert docker("exec", container, "test", "-e", "/run/secrets/model-key", check=False).returncode != 0, name


@pytest.mark.parametrize("value", ["confined-sandboxes", "agent_sandboxes.2"])
def test_a_user_defined_docker_network_is_a_setting(value: str) -> None:
    from hosting.sandboxes.settings import BackendSettings

    settings = BackendSettings.from_env({"GATEWAY_DOCKER_NETWORK": value}, "GATEWAY_", data_dir=Path("d"),
                                        installation="default", modal_app="m", start_timeout_seconds=1)
    assert settings.docker_network == value


@pytest.mark.parametrize("value", ["none", "container:abc", "-x", "a b", "x" * 129])
def test_a_docker_network_that_cannot_hold_sandboxes_is_refused(value: str) -> None:
    from hosting.sandboxes.settings import BackendSettings
    from hosting.settings_env import ConfigError

    with pytest.raises(ConfigError, match="GATEWAY_DOCKER_NETWORK must be bridge, host or the name of a Docker network"):
        BackendSettings.from_env({"GATEWAY_DOCKER_NETWORK": value}, "GATEWAY_", data_dir=Path("d"),
                                 installation="default", modal_app="m", start_timeout_seconds=1)


def test_a_sandbox_on_a_user_defined_network_is_addressed_by_its_container_name() -> None:
    from hosting.sandboxes.docker import _sandbox

    labels = {"research-agent.sandbox": "sb-1", "research-agent.volume": "v", "research-agent.session": "s",
              "research-agent.tenant": "acme", "research-agent.created-at": "1.0", "research-agent.port": "8000"}
    assert _sandbox(labels, "confined-sandboxes", {}).address == "http://agent-sb-1:8000"
    assert _sandbox(labels, "bridge", {8000: 41234}).address == "http://127.0.0.1:41234"
