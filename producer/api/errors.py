"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every way a request fails.

A database or Redis that cannot be reached is 503 with `Retry-After`, never a 500 with a traceback. Nothing logged
here holds a request's content: a database error is logged by its driver's first line (SQLAlchemy's own text
would include the statement's parameters), anything unexpected by its type and stack, not its message.
"""
from __future__ import annotations

import logging
import traceback

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException

from schemas.sql.lifecycle import is_infrastructure_error

log = logging.getLogger(__name__)
RETRY_AFTER_S = 5


class ApiError(Exception):
    """A request the API refuses, with its HTTP status and OpenAI's error type and code."""

    def __init__(self, status_code: int, message: str, *, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.type, self.code, self.param = status_code, message, type_, code, param
        self.headers = headers


def not_found(kind: str, object_id: str) -> ApiError:
    """404 for an id that does not exist or is another key's: the two are never told apart."""
    return ApiError(404, f"No such {kind} object: {object_id}", code="not_found")


def unavailable(what: str) -> ApiError:
    return ApiError(503, f"{what} is unavailable; retry in a few seconds", type_="server_error",
                    code="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


def json_position(document: str, pos: int) -> str:
    """Where `pos` is in `document`, as a person finds it: line, column and character offset."""
    line = document.count("\n", 0, pos) + 1
    column = pos - (document.rfind("\n", 0, pos) + 1) + 1
    return f"line {line} column {column} (char {pos})"


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        body = error.body if isinstance(error.body, str) else ""
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        where = json_position(body, first["loc"][-1])
        return f"We could not parse the JSON body of your request: {reason} at {where}", None
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"] if p not in ("body", "query", "path"))
        problems.append(f"{where or 'body'}: {item['msg']}")
    first_param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path")) or None
    return "Invalid request: " + "; ".join(problems), first_param


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into OpenAI's error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(error)
        return error_response(ApiError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = "Unknown request URL. Please check the URL and method."
        elif error.status_code == 413:
            message = "Request body too large"
        else:
            message = str(error.detail)
        return error_response(ApiError(error.status_code, message, code={404: "unknown_url"}.get(error.status_code),
                                       headers=getattr(error, "headers", None)))

    @app.exception_handler(DBAPIError)
    async def _database(_request: Request, error: DBAPIError) -> JSONResponse:
        first_line = str(error.orig).splitlines()[0] if error.orig else type(error).__name__
        if is_infrastructure_error(error):
            log.warning("database unavailable: %s", first_line)
            return error_response(unavailable("The database"))
        log.error("database error %s: %s", type(error).__name__, first_line)
        return error_response(ApiError(500, "internal error", type_="server_error"))

    @app.exception_handler(redis.RedisError)
    @app.exception_handler(BrokerError)
    async def _broker(_request: Request, error: Exception) -> JSONResponse:
        log.warning("Redis unavailable: %s", type(error).__name__)
        return error_response(unavailable("The queue (Redis)"))

    app.add_middleware(CatchAll)


class CatchAll:
    """ASGI middleware: an unexpected error is a 500 in OpenAI's shape, logged by its type and stack only (Starlette's
    own last resort would log its message, and uvicorn the whole exception, which may quote a request's content)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:  # noqa: BLE001: the last resort, by design
            log.error("unexpected %s in %s %s:\n%s", type(error).__name__, scope.get("method"), scope.get("path"),
                      "".join(traceback.format_tb(error.__traceback__)))
            if not started:
                await error_response(ApiError(500, "internal error", type_="server_error"))(scope, receive, send)
