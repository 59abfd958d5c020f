"""Domain errors -> HTTP. The only place FlywheelError meets a status code.

Bad input never gets a 5xx: every 4xx body is JSON and says what is wrong, with the
field path where one is to blame.
"""
from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_app import errors

log = logging.getLogger("flywheel.serve")

STATUS: dict[type[errors.FlywheelError], int] = {
    errors.MalformedJSON: 400,
    errors.InvalidRecord: 422,
    errors.ConfigError: 422,
    errors.PayloadTooLarge: 413,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.PolicyDenied: 403,
    errors.StoreUnavailable: 503,
    errors.UpstreamFailed: 502,
    errors.UpstreamTimeout: 504,
}


def status_for(exc: errors.FlywheelError) -> int:
    for cls in type(exc).__mro__:  # the most specific class wins
        if cls in STATUS:
            return STATUS[cls]
    return 500


def _json(body: dict, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


OPENAI_PATHS = ("/v1/chat/completions", "/v1/models")  # what OpenAI's clients call: errors in OpenAI's shape


def _body(request: Request, exc: errors.FlywheelError) -> dict:
    """Flywheel's error body; on OpenAI's routes OpenAI's (`{"error": {"message", "type", "param", "code"}}`),
    so an OpenAI client shows the message."""
    if not any(p in request.url.path for p in OPENAI_PATHS):
        return exc.to_dict()
    return {"error": {"message": exc.message, "type": exc.reason, "param": exc.field, "code": exc.reason,
                      **exc.details}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.FlywheelError)
    async def _domain(request: Request, exc: errors.FlywheelError) -> Response:
        status = status_for(exc)
        headers = None
        if isinstance(exc, errors.StoreUnavailable):
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
        if status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        if status >= 500:
            log.error("request failed: %s", exc.message)
        return _json(_body(request, exc), status, headers)

    @app.exception_handler(RequestValidationError)
    async def _query(_: Request, exc: RequestValidationError) -> Response:
        problems = [{"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
        first = problems[0] if problems else {"field": "(request)", "message": "invalid request"}
        return _json({"error": "invalid_input", "message": f"{first['field']}: {first['message']}",
                      "field": first["field"], "errors": problems}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _json({"error": reason, "message": str(exc.detail)}, exc.status_code)
