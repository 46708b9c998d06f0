"""ASGI middleware: the gateway's request-body limit.

A body larger than `max_bytes` is refused with 413 in the OpenAI error format before the app
parses it: at once when `Content-Length` says so, otherwise as soon as the streamed body
passes the limit (chunked uploads). The app never buffers more than the limit.
"""
from __future__ import annotations

import json

from baton.router.gateway.errors import error_body


class BodyTooLarge(Exception):
    """The streamed body passed the limit."""


class BodyLimit:
    """Wraps an ASGI app; HTTP requests with bodies over `max_bytes` get 413."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        seen = [0]
        started = [False]

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)
        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started[0]:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(error_body(f"request body exceeds the {self.max_bytes}-byte limit", 413,
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
