"""Remove what ``modal_app.py`` deployed: every sandbox of the app, the volume (the
conversations) and the Dict of tokens. Says what it removed; running it again removes
nothing and says so.

    python hosting/modal/teardown.py [--app research-agent] [--volume research-agent-data]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from hosting.sandboxes.base import SandboxError
from hosting.sandboxes.modal import require_client

with contextlib.suppress(ImportError):  # the modal extra; without it main() says so in one line
    import modal
    import modal.exception


async def teardown(app_name: str, volume: str) -> list[str]:
    """What was removed, one line each."""
    removed = []
    try:
        app = await modal.App.lookup.aio(app_name)
    except modal.exception.NotFoundError:
        pass  # never deployed, or its app is gone: no sandbox can run in it
    else:
        async for sandbox in modal.Sandbox.list.aio(app_id=app.app_id):
            await sandbox.terminate.aio()
            removed.append(f"terminated sandbox {sandbox.object_id}")
    for kind, manager, name in (("volume", modal.Volume.objects, volume),
                                ("token dict", modal.Dict.objects, f"{app_name}-tokens")):
        try:
            await manager.delete.aio(name)
        except modal.exception.NotFoundError:
            continue
        removed.append(f"deleted {kind} {name}")
    return removed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Remove the Modal deployment of modal_app.py.")
    parser.add_argument("--app", default="research-agent", help="Modal app name (default: %(default)s)")
    parser.add_argument("--volume", default="research-agent-data", help="Modal Volume to delete (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        require_client()
    except SandboxError as exc:
        sys.exit(f"teardown: {exc}")
    try:
        removed = asyncio.run(teardown(args.app, args.volume))
    except modal.exception.AuthError as exc:
        sys.exit(f"teardown: no usable Modal credentials ({exc}): run `modal setup` "
                 "or set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET")
    except modal.exception.Error as exc:
        sys.exit(f"teardown: Modal refused: {exc}")
    print("\n".join(removed) if removed else "nothing to remove")


if __name__ == "__main__":
    main()
