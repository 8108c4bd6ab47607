"""The webhook receiver: a signed delivery from the service asks for a drain.

``POST /webhooks`` verifies the standard-webhooks signature with the SDK
(``client.beta.webhooks.unwrap`` and the environment's signing secret) and, only then,
wakes the drain in the background and answers 202 at once: the service does not wait
for sandboxes. A bad or missing signature is refused with 400 and starts nothing.
Its body limit and its errors are the contract's (:func:`hosting.contract.install_error_answers`,
as on the server and the gateway): a declared length over the limit is refused before a
byte is read, a chunked body the moment it passes it, with 413; nothing is buffered
beyond the limit.
``GET /health`` answers liveness.
"""

from __future__ import annotations

import logging

from anthropic import AsyncAnthropic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from standardwebhooks.webhooks import WebhookVerificationError

from hosting.contract import install_error_answers
from hosting.environments.dispatch import Dispatcher
from hosting.errors import ErrorCode, HostingError

logger = logging.getLogger("hosting.environments.webhook")


def create_app(api: AsyncAnthropic, signing_secret: str, dispatcher: Dispatcher) -> FastAPI:
    app = FastAPI(title="agent-environment-orchestrator", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_answers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/webhooks")
    async def webhook(request: Request) -> Response:
        body = await request.body()  # within the limit: BodySizeLimit answered 413 otherwise
        try:
            event = api.beta.webhooks.unwrap(body.decode(errors="replace"), headers=dict(request.headers),
                                             key=signing_secret)
        except (WebhookVerificationError, ValueError) as exc:
            logger.warning("refused a webhook delivery: %s", exc)
            raise HostingError("invalid webhook signature", code=ErrorCode.BAD_REQUEST) from None
        logger.info("webhook %s (%s): draining the queue", event.id, getattr(event.data, "type", "?"))
        dispatcher.drain_requested.set()
        return JSONResponse({"accepted": True}, status_code=202)

    return app
