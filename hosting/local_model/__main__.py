"""``python -m hosting.local_model --port 8787``: serve the local model.

Then point the agent at it: ``ANTHROPIC_BASE_URL=http://127.0.0.1:8787``.
"""

from __future__ import annotations

import argparse
import logging

import uvicorn

from hosting.local_model.app import MODEL_NAME, create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the offline local model (not Claude).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("hosting.local_model").warning(
        "LOCAL MODEL: deterministic scripted replies as %r, NOT Claude, on http://%s:%d",
        MODEL_NAME, args.host, args.port,
    )
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
