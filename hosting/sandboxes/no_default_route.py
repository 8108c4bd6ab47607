"""Remove the IPv4 default routes of the network namespace this runs in.

The docker backend runs it once per sandbox on a user-defined network, in a short-lived
container that shares the sandbox's network namespace (``--network container:<sandbox>``)
with ``CAP_NET_ADMIN`` alone, before the sandbox serves anything. Docker before 26 gives a
container on an ``internal`` network a default route to the network's gateway address
(moby/moby#46603); the engine forwards nothing from there, but a sandbox should not even
have a route out of its subnet. The sandbox itself never holds ``CAP_NET_ADMIN``.

pyroute2 speaks netlink, so the image needs no ``ip`` binary.
"""

from __future__ import annotations

from socket import AF_INET

from pyroute2 import IPRoute


def main() -> None:
    with IPRoute() as ipr:
        for route in ipr.get_default_routes(family=AF_INET):
            ipr.route("del", dst="0.0.0.0/0", oif=route.get("RTA_OIF"), gateway=route.get("RTA_GATEWAY"))
        if ipr.get_default_routes(family=AF_INET):
            raise SystemExit("a default route is left")


if __name__ == "__main__":
    main()
