"""A stand-in for Modal's control plane, for tests: the pinned ``modal`` client talks real gRPC to it.

:class:`ModalStandIn` serves :mod:`tests.modal_standin.control_plane` on 127.0.0.1 (h2c, as
``MODAL_SERVER_URL=http://127.0.0.1:PORT`` makes the client speak), builds images and runs
sandboxes with the local Docker engine (:mod:`~tests.modal_standin.engine`) and serves their
tunnels as HTTPS on loopback with a test CA (:mod:`~tests.modal_standin.tunnels`).
"""

from tests.modal_standin.server import ModalStandIn

__all__ = ["ModalStandIn"]
