"""The client services use to send their LLM traffic to Flywheel.

    from ray_app.client import FlywheelClient
    c = FlywheelClient("http://127.0.0.1:8000", api_key=KEY, spool_dir="/var/spool/flywheel")
    c.log(record)          # returns at once
    c.flush(timeout=30.0)  # True when everything was acknowledged
    c.close()

Only httpx, orjson and the standard library; the OpenAI wrapper is in `ray_app.client.openai_wrapper`.
"""
from ray_app.client.clients import AsyncFlywheelClient, FlywheelClient
from ray_app.client.core import new_record_id
from ray_app.client.errors import (
    AuthError,
    ClientClosed,
    ClientError,
    RecordDropped,
    RecordRejected,
    RouteNotFound,
)

__all__ = [
    "AsyncFlywheelClient", "AuthError", "ClientClosed", "ClientError", "FlywheelClient",
    "RecordDropped", "RecordRejected", "RouteNotFound", "new_record_id",
]
