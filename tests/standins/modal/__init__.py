"""A stand-in for Modal's control plane, for tests: the pinned ``modal`` client talks real gRPC to it.

:class:`ModalStandIn` serves :mod:`tests.standins.modal.control_plane` on 127.0.0.1 (h2c, as
``MODAL_SERVER_URL=http://127.0.0.1:PORT`` makes the client speak), builds images and runs
sandboxes with the local Docker engine (:mod:`~tests.standins.modal.engine`), serves their
tunnels as HTTPS on loopback with a test CA (:mod:`~tests.standins.modal.tunnels`) and runs
commands in them through a command router over TLS (:mod:`~tests.standins.modal.command_router`).
"""

from tests.standins.modal.server import ModalStandIn

__all__ = ["ModalStandIn"]
