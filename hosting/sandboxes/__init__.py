"""Sandbox backends behind one interface: the gateway starts, finds and removes
the sandboxes it routes to through :class:`SandboxBackend` only.

Modules:

- ``base``: the interface and the cut-off (what a backend does and leaves to the gateway)
- ``memory``: in-memory, no processes, for unit tests of the logic above it
- ``local``: server processes on this machine (the default; Python only, no root)
- ``docker``: containers of the product image (needs the ``docker`` extra)
- ``kubernetes``: pods from one pod template (needs the ``kubernetes`` extra)
- ``modal``: Modal Sandboxes, and the one definition of the agent's sandbox (needs the ``modal`` extra)
- ``settings``: which backend a host uses and its options, read once under the host's prefix
- ``launch``: runs inside a sandbox; starts a command sent on stdin (the kubernetes backend's exec)

The backend modules are imported where chosen, so the Docker SDK (or the Kubernetes
client) is needed only by a gateway that uses it.
"""

from hosting.sandboxes.base import Health, Sandbox, SandboxBackend, SandboxError, SandboxSpec

__all__ = ["Health", "Sandbox", "SandboxBackend", "SandboxError", "SandboxSpec"]
