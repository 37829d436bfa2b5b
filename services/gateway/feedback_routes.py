"""`POST /v1/feedback`: the REST adapter of the FeedbackRecorder. Errors are answered by app.py's
error middleware (services/mesh/transport/rest.py holds the one table)."""

from __future__ import annotations

from aiohttp import web

from services.gateway.feedback import FeedbackRecorder
from services.mesh.transport.rest import json_response, read_body

FEEDBACK = web.AppKey("feedback", FeedbackRecorder)
PATH = "/v1/feedback"
MAX_BODY_BYTES = 16 << 10
"""Feedback is a few short fields; a larger body is refused before it is read."""


async def post_feedback(request: web.Request) -> web.Response:
    recorder = request.app[FEEDBACK]
    tenant = recorder.authenticate(request.headers.get)  # 401/403 before the body is read
    raw = await read_body(request, limit=MAX_BODY_BYTES)
    feedback = await recorder.record(tenant, raw)
    body = {"request_id": feedback.request_id, "kind": feedback.kind, "stored": True}
    return json_response(body)


def add_feedback_route(app: web.Application, recorder: FeedbackRecorder) -> None:
    """Serve `POST /v1/feedback` through `recorder`."""
    app[FEEDBACK] = recorder
    app.router.add_post(PATH, post_feedback)
