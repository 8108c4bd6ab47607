"""A stand-in for Modal's control plane, for tests: the pinned ``modal`` client talks real gRPC to it.

:class:`ModalStandIn` serves :mod:`tests.modal_standin.control_plane` on 127.0.0.1 (h2c, as
``MODAL_SERVER_URL=http://127.0.0.1:PORT`` makes the client speak), builds images and runs
sandboxes with the local Docker engine (:mod:`~tests.modal_standin.engine`), serves their
tunnels as HTTPS on loopback with a test CA (:mod:`~tests.modal_standin.tunnels`) and runs
commands in them through a command router over TLS (:mod:`~tests.modal_standin.command_router`).
"""

from tests.modal_standin.server import ModalStandIn

__all__ = ["ModalStandIn"]
