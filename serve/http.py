"""The FastAPI app every Flywheel route hangs on, and the JSON helpers the routes share.

One module, so the ingress class (serve/app.py) and the gateway's routes (serve/gateway.py) add
their handlers to the same `api`. No `from __future__ import annotations`: FastAPI must see real
types through Serve's ingress wrapper.
"""

from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import TypeAdapter

from ray_app.errors import MalformedJSON
from serve.errors import install_error_handlers
from serve.metrics import RequestMetrics

api = FastAPI(title="Flywheel", version="0.1.0")
install_error_handlers(api)
api.add_middleware(RequestMetrics)  # counts nothing until a replica sets `api.state.metrics`


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json", headers=headers)


def parse_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"malformed JSON: {exc}", field="(body)") from exc


def body(*types: Any, example: Any = None) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body raw (for speed): the JSON schema of what it takes,
    any of `types` (a TypedDict, a pydantic model or a plain JSON schema dict), so the OpenAPI document
    (and schemathesis, which fuzzes the app from it) knows every body."""
    schemas = [t if isinstance(t, dict) else _inlined(TypeAdapter(t).json_schema()) for t in types]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"requestBody": {"required": True, "content": {"application/json": media}}}


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with its `$defs` references written in place: an OpenAPI document has no `$defs`."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node
    return walk(schema)
