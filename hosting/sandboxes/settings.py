"""Which sandbox backend a process uses, and how: one typed reading shared by every host.

The gateway (``GATEWAY_*``) and the Managed Agents orchestrator (``ENVIRONMENT_*``)
both start sandboxes; they read the same settings under their own prefix, so a
backend option exists once and means the same in both, and :func:`open_backend`
is the one place that turns settings into a backend.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hosting.sandboxes.base import SandboxBackend
from hosting.settings_env import ConfigError, choice_setting, float_setting, int_setting, optional_setting

BackendName = Literal["local", "docker", "kubernetes", "modal"]
BACKENDS: tuple[BackendName, ...] = ("local", "docker", "kubernetes", "modal")
_DOCKER_NETWORK_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")
"""A network name as the engine accepts one (``none`` and ``container:<id>`` are refused apart)."""
KubernetesVolumes = Literal["emptydir", "pvc"]
KUBERNETES_VOLUMES: tuple[KubernetesVolumes, ...] = ("emptydir", "pvc")
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[KMGTPE]i|[kMGTPE])?")
"""A storage quantity as the API reads one: a decimal number and a binary or decimal suffix."""
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _volume_size(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    quantity = _QUANTITY.fullmatch(raw)
    if quantity is None or float(quantity.group(1)) <= 0:
        raise ConfigError(f"{name} must be a storage size such as 1Gi or 500Mi, got {raw!r}")
    return raw


def _docker_network(env: Mapping[str, str], name: str) -> str:
    """``bridge`` (unset), ``host``, or the name of a user-defined network; ``none`` would leave
    the gateway no way to reach its sandboxes."""
    raw = env.get(name, "").strip() or "bridge"
    if raw == "none" or not _DOCKER_NETWORK_NAME.fullmatch(raw):
        raise ConfigError(f"{name} must be bridge, host or the name of a Docker network, got {raw!r}")
    return raw


def _storage_class(env: Mapping[str, str], name: str) -> str | None:
    raw = optional_setting(env, name)
    if raw is not None and not (len(raw) <= 253 and _DNS_SUBDOMAIN.fullmatch(raw)):
        raise ConfigError(f"{name} must name a StorageClass (a DNS subdomain: a-z, 0-9, '-' and '.'), got {raw!r}")
    return raw


@dataclass(frozen=True)
class BackendSettings:
    """The backend and its options; each field is ``<prefix><NAME>`` in the environment."""

    backend: BackendName = "local"
    data_dir: Path = Path("data")
    """``DATA_DIR``: the local backend's sandboxes and volumes."""
    installation: str = "default"
    """``INSTALLATION``: labels this host's sandboxes; another installation never sees or removes them."""
    start_timeout_seconds: float = 120.0
    """How long a local sandbox may take to answer (the host's provisioning timeout)."""
    docker_image: str = "research-agent"
    docker_network: str = "bridge"
    """``DOCKER_NETWORK``: ``bridge`` publishes each sandbox on 127.0.0.1 and ``host`` shares the
    host's network (both development modes); any other name is a user-defined network the
    sandboxes join with no published port, addressed by container name (the confined tier,
    hosting/docker/gateway-compose.yml)."""
    kubernetes_namespace: str = "default"
    """``KUBERNETES_NAMESPACE``: where sandbox pods are made."""
    kubernetes_pod_template: Path = Path("/etc/agent-gateway/agent-pod-template.yaml")
    """``KUBERNETES_POD_TEMPLATE``: the sandbox pod manifest, mounted from its ConfigMap."""
    kubeconfig: Path | None = None
    """``KUBECONFIG``: a kubeconfig file; unset, the pod's service account (in-cluster)."""
    kubernetes_image: str | None = None
    """``KUBERNETES_IMAGE``: replaces the pod template's image when set."""
    kubernetes_volumes: KubernetesVolumes = "emptydir"
    """``KUBERNETES_VOLUMES``: ``emptydir``, a pod's ``/data`` goes with it (conversations outlive
    pods only through ``AGENT_SESSION_STORE``); ``pvc``, each session's volume is a
    PersistentVolumeClaim that replacement pods mount again and ``DELETE`` of the session removes."""
    kubernetes_volume_size: str = "1Gi"
    """``KUBERNETES_VOLUME_SIZE``: the storage each claim asks for (``pvc`` mode), a quantity."""
    kubernetes_storage_class: str | None = None
    """``KUBERNETES_STORAGE_CLASS``: the claims' StorageClass (``pvc`` mode); unset, the cluster's default."""
    modal_app: str = "research-agent-gateway"
    """``MODAL_APP``: the Modal app the sandboxes run in (Modal's credentials: ``modal setup`` or ``MODAL_TOKEN_*``)."""
    modal_secrets: tuple[str, ...] = ()
    """``MODAL_SECRETS``: Modal secrets every sandbox gets (comma-separated names, e.g. ``anthropic``)."""
    sandbox_memory_bytes: int = 1024**3
    """``SANDBOX_MEMORY_BYTES``: a docker or modal sandbox's memory limit (kubernetes: the pod template's)."""
    sandbox_cpus: float = 1.0
    """``SANDBOX_CPUS``: a docker or modal sandbox's CPU limit."""

    @classmethod
    def from_env(cls, env: Mapping[str, str], prefix: str, *, data_dir: Path, installation: str, modal_app: str,
                 start_timeout_seconds: float) -> BackendSettings:
        """Read ``<prefix>BACKEND`` and the rest; the keyword arguments are this host's defaults."""
        kubeconfig = optional_setting(env, f"{prefix}KUBECONFIG")
        settings = cls(
            backend=choice_setting(env, f"{prefix}BACKEND", BACKENDS),
            data_dir=Path(optional_setting(env, f"{prefix}DATA_DIR") or data_dir),
            installation=optional_setting(env, f"{prefix}INSTALLATION") or installation,
            start_timeout_seconds=start_timeout_seconds,
            docker_image=optional_setting(env, f"{prefix}DOCKER_IMAGE") or cls.docker_image,
            docker_network=_docker_network(env, f"{prefix}DOCKER_NETWORK"),
            kubernetes_namespace=optional_setting(env, f"{prefix}KUBERNETES_NAMESPACE") or cls.kubernetes_namespace,
            kubernetes_pod_template=Path(optional_setting(env, f"{prefix}KUBERNETES_POD_TEMPLATE")
                                         or cls.kubernetes_pod_template),
            kubeconfig=Path(kubeconfig) if kubeconfig else None,
            kubernetes_image=optional_setting(env, f"{prefix}KUBERNETES_IMAGE"),
            kubernetes_volumes=choice_setting(env, f"{prefix}KUBERNETES_VOLUMES", KUBERNETES_VOLUMES),
            kubernetes_volume_size=_volume_size(env, f"{prefix}KUBERNETES_VOLUME_SIZE", cls.kubernetes_volume_size),
            kubernetes_storage_class=_storage_class(env, f"{prefix}KUBERNETES_STORAGE_CLASS"),
            modal_app=optional_setting(env, f"{prefix}MODAL_APP") or modal_app,
            modal_secrets=tuple(name.strip() for name in env.get(f"{prefix}MODAL_SECRETS", "").split(",")
                                if name.strip()),
            sandbox_memory_bytes=int_setting(env, f"{prefix}SANDBOX_MEMORY_BYTES", cls.sandbox_memory_bytes,
                                             minimum=64 * 1024**2),
            sandbox_cpus=float_setting(env, f"{prefix}SANDBOX_CPUS", cls.sandbox_cpus),
        )
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", settings.kubernetes_namespace):
            raise ConfigError(f"{prefix}KUBERNETES_NAMESPACE must be a DNS label (1-63 of a-z, 0-9 and '-')")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,19}", settings.installation):
            raise ConfigError(f"{prefix}INSTALLATION must be 1-20 characters of a-z, 0-9 and '-'")
        return settings


def open_backend(settings: BackendSettings) -> SandboxBackend:
    """The configured backend; raises :class:`~hosting.sandboxes.base.SandboxError` if it
    cannot be used here (its SDK missing, no engine). Optional SDKs import only when chosen."""
    if settings.backend == "docker":
        from hosting.sandboxes.docker import DockerBackend

        return DockerBackend(image=settings.docker_image, installation=settings.installation,
                             network=settings.docker_network, memory_bytes=settings.sandbox_memory_bytes,
                             nano_cpus=int(settings.sandbox_cpus * 1e9))
    if settings.backend == "kubernetes":
        from hosting.sandboxes.kubernetes import KubernetesBackend

        return KubernetesBackend(settings.kubernetes_pod_template, settings.kubernetes_namespace, settings.installation,
                                 kubeconfig=settings.kubeconfig, image=settings.kubernetes_image,
                                 volumes=settings.kubernetes_volumes, volume_size=settings.kubernetes_volume_size,
                                 storage_class=settings.kubernetes_storage_class)
    if settings.backend == "modal":
        from hosting.sandboxes.modal import ModalBackend

        return ModalBackend(settings.modal_app, settings.installation, secrets=settings.modal_secrets,
                            memory_bytes=settings.sandbox_memory_bytes, cpus=settings.sandbox_cpus)
    from hosting.sandboxes.local import LocalBackend

    return LocalBackend(settings.data_dir, installation=settings.installation,
                        start_timeout=settings.start_timeout_seconds)
