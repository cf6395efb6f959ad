"""Request body limits, as an ASGI layer around the application: an upload may be `api_max_upload_bytes` (plus its
multipart framing), any other body `api_max_request_bytes`. A `Content-Length` over the limit is answered 413 before
the body is read; a body without one is counted as it streams in and stopped at the limit. FastAPI's own per-route
limit is newer than the FastAPI that vLLM pins (below 0.137), so docbatch counts for itself."""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.api.errors import ApiError, error_response
from schemas.settings import Settings

MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries, headers and the purpose field around an uploaded file's bytes
UPLOAD_PATH = "/v1/files"


class _TooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.upload_bytes = settings.api_max_upload_bytes + MULTIPART_OVERHEAD_BYTES
        self.request_bytes = settings.api_max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE"):
            return await self.app(scope, receive, send)
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH
        limit = self.upload_bytes if upload else self.request_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(limit, upload, scope, receive, send)
        seen, started = 0, False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if started:
                raise
            await self._refuse(limit, upload, scope, receive, send)

    @staticmethod
    async def _refuse(limit: int, upload: bool, scope: Scope, receive: Receive, send: Send) -> None:
        what = "an upload (with its multipart framing)" if upload else "a request body"
        error = ApiError(413, f"Request body too large: over the limit of {limit} bytes for {what}",
                         code="file_too_large" if upload else "request_too_large")
        await error_response(error)(scope, receive, send)
