"""The FastAPI app every Flywheel route hangs on, and the JSON helpers the routes share.

One module, so the ingress class (serve/app.py) and the gateway's routes (serve/gateway.py) add
their handlers to the same `api`. No `from __future__ import annotations`: FastAPI must see real
types through Serve's ingress wrapper.
"""

from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.responses import Response

from ray_app.errors import MalformedJSON
from serve.errors import install_error_handlers

api = FastAPI(title="Flywheel", version="0.1.0")
install_error_handlers(api)


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json", headers=headers)


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"malformed JSON: {exc}", field="(body)") from exc
