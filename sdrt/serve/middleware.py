"""Pure ASGI middleware: one structured log line and metrics per request, auth, request body size.

Log line (logger ``sdrt.serve.access``): JSON with route, method, path, status, job id, seconds.
"""

from __future__ import annotations

import json
import logging
import time

from sdrt.serve.auth import Authenticator
from sdrt.serve.errors import ApiError, body

log = logging.getLogger("sdrt.serve.access")

OPEN_PATHS = ("/healthz",)


def _template(scope) -> str:
    """The matched path with each path parameter as its name ("/v1/jobs/{job_id}"): bounded label values."""
    path = scope.get("path", "")
    for key, value in reversed(list((scope.get("path_params") or {}).items())):
        head, sep, tail = path.rpartition(f"/{value}")
        if sep:
            path = f"{head}/{{{key}}}{tail}"
    return path


async def send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    data = json.dumps(payload).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": data})


class AccessMiddleware:
    """Auth and body limit before the app; the log line and request metrics after it."""

    def __init__(self, app, state):
        self.app, self.state = app, state
        self.auth = Authenticator(state.options.users, state.options.tokens)
        self.max_body = state.options.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if scope["path"] not in OPEN_PATHS and not self.auth.allows(dict(scope["headers"]).get(b"authorization")):
                await send_json(sending, 401, body("Unauthorized", "missing or wrong credentials"),
                                self.auth.challenges())
                return
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                await send_json(sending, 413, body("PayloadTooLarge",
                                                   f"request body over the limit of {self.max_body} bytes"))
                return
            await self.app(scope, self._limited(receive), sending)
        finally:
            self._log(scope, status["code"], time.perf_counter() - start)

    def _limited(self, receive):
        seen = {"bytes": 0}

        async def limited():
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > self.max_body:
                    raise ApiError(413, f"request body over the limit of {self.max_body} bytes")
            return message

        return limited

    def _log(self, scope, status: int, seconds: float) -> None:
        route = _template(scope) if scope.get("route") is not None else "unmatched"
        job = (scope.get("state") or {}).get("job_id")
        self.state.metrics.observe_request(route, status, seconds)
        log.info(json.dumps({"route": route, "method": scope.get("method"), "path": scope.get("path"),
                             "status": status, "job": job, "seconds": round(seconds, 4)}))


def install(app, state) -> None:
    app.add_middleware(AccessMiddleware, state=state)
