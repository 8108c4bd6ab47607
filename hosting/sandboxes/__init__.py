"""Sandbox backends behind one interface: the gateway starts, finds and removes
the sandboxes it routes to through :class:`SandboxBackend` only.

Modules:

- ``base``: the interface and the cut-off (what a backend does and leaves to the gateway)
- ``memory``: in-memory, no processes, for unit tests of the logic above it
- ``local``: server processes on this machine (the default; Python only, no root)
- ``docker``: containers of the product image (needs the ``docker`` extra)

The backend modules are imported where chosen, so the Docker SDK is needed only
by a gateway that uses Docker.
"""

from hosting.sandboxes.base import Health, Sandbox, SandboxBackend, SandboxError, SandboxSpec

__all__ = ["Health", "Sandbox", "SandboxBackend", "SandboxError", "SandboxSpec"]
