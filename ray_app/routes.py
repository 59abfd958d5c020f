"""Who answers a workload's chat completions: the route table and its one decision per call.

A route belongs to a workload (`workload_id`, `client_id`) and names a registered model and a mode:

- `off`: the production upstream answers (the call is logged: zero-code instrumentation).
- `shadow`: the upstream answers; the model answers the same request off the hot path.
- `canary`: a share `weight` of calls goes to the model, the rest to the upstream; sticky per
  OpenAI `user` when the request names one (the same user always sees the same side). A share
  `mirror` of the model's calls is also sent to the upstream, as in `live`.
- `live`: the model answers; a share `mirror` of calls is also sent to the upstream, so agreement
  keeps being measured.

Routes live in the job store's `routes` collection, one document per workload; each gateway
replica reads them through `RouteTable`, which keeps them a second (a change reaches every replica
within that second, and the hot path reads no store).
"""
from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ray_app.storage.base import JobStore

COLLECTION = "routes"
Mode = Literal["off", "shadow", "canary", "live"]


class GatewayConfig(BaseModel):
    """`gateway:` in the settings: the production upstream, and how candidates are served."""

    model_config = ConfigDict(extra="forbid")
    upstream_url: str | None = None  # any OpenAI-compatible base URL, e.g. https://api.openai.com/v1
    upstream_api_key_env: str = "FLYWHEEL_UPSTREAM_API_KEY"  # the env var holding its key
    upstream_api_key: str | None = None  # read from that env var by load_settings; never put it in a file
    timeout_s: float = Field(60.0, gt=0.0)  # an upstream slower than this is a 504 (or the other side answers)
    shadow_timeout_s: float = Field(120.0, gt=0.0)  # a shadow answer later than this is dropped
    max_side_calls: int = Field(8, ge=0)  # shadow/mirror calls in flight per replica; more are skipped, not queued
    mirror: float = Field(0.1, ge=0.0, le=1.0)  # live: share of calls also sent upstream
    model_replicas: int = Field(1, ge=1)
    model_max_replicas: int | None = Field(None, ge=1)  # set: autoscale between model_replicas and this
    model_num_cpus: float = Field(1.0, ge=0.0)
    model_num_gpus: float = Field(0.0, ge=0.0, le=1.0)
    max_batch_size: int = Field(8, ge=1)  # decoder slots: calls decoded at once (continuous batching)
    batch_wait_s: float = Field(0.05, ge=0.0)  # how long a call waits for others to batch with (decodes take s)
    max_new_tokens: int = Field(256, ge=1)  # when the request sets no max_tokens
    route_cache_s: float = Field(1.0, ge=0.0)
    # live agreement and the rollback rule (serve/live.py): the last window_size calls a model took part in,
    # judged after every min_window of them
    window_size: int = Field(200, ge=1)
    min_window: int = Field(30, ge=1)
    max_error_rate: float = Field(0.05, ge=0.0, le=1.0)  # the model's failed calls, share of its window
    max_p99_ms: float | None = Field(None, gt=0.0)  # None: latency never rolls a model back
    # the way up (serve/live.py): shadow -> canary -> live once a full window in the mode clears the threshold
    auto_promote: bool = False
    canary_weight: float = Field(0.1, gt=0.0, le=1.0)  # the share an automatically promoted canary answers


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workload_id: str = Field(min_length=1, max_length=256)
    client_id: str = Field(min_length=1, max_length=256)
    model: str | None = None  # a registered model id; None only with mode "off"
    mode: Mode = "off"
    weight: float = Field(0.0, ge=0.0, le=1.0)  # canary: share of calls the model answers
    mirror: float | None = Field(None, ge=0.0, le=1.0)  # live: share mirrored upstream (None: settings)
    updated_at: float = Field(default_factory=time.time)


def route_key(workload_id: str, client_id: str) -> str:
    return f"{workload_id}/{client_id}"


def get_route(store: JobStore, workload_id: str, client_id: str) -> Route:
    doc = store.get_doc(COLLECTION, route_key(workload_id, client_id))
    return Route.model_validate(doc) if doc else Route(workload_id=workload_id, client_id=client_id)


def put_route(store: JobStore, route: Route) -> Route:
    store.update_doc(COLLECTION, route_key(route.workload_id, route.client_id),
                     lambda doc: (doc.clear(), doc.update(route.model_dump(mode="json"))))
    return route


def replace_route(store: JobStore, expected: Route, new: Route) -> bool:
    """`new` in place of `expected`, atomically; False, and nothing written, when the route changed
    meanwhile: two replicas judging the same window at once change it once (like the job stages)."""
    changed = False

    def mutate(doc: dict) -> None:
        nonlocal changed
        changed = False  # a store that retries `mutate` on a write conflict sees the newer document
        current = (doc.get("model"), doc.get("mode"), doc.get("updated_at"))
        if current == (expected.model, expected.mode, expected.updated_at):
            doc.clear()
            doc.update(new.model_dump(mode="json"))
            changed = True
    store.update_doc(COLLECTION, route_key(new.workload_id, new.client_id), mutate)
    return changed


def list_routes(store: JobStore) -> list[Route]:
    return [Route.model_validate(doc) for _, doc in store.list_docs(COLLECTION)]


@dataclass(frozen=True)
class Decision:
    """One call's sides: who answers, and who else answers the same request off the hot path."""
    answer: str  # "upstream" or a model id
    also: str | None  # the shadow (model) or the mirror (upstream); None: nobody
    fallback: str | None  # who answers when `answer` fails


UPSTREAM = "upstream"


def decide(route: Route, *, user: str | None, mirror: float, draw: Callable[[], float] = random.random) -> Decision:
    """The sides of one call under `route`. `user`: OpenAI's `user` field, for sticky canaries."""
    if route.mode == "off" or route.model is None:
        return Decision(UPSTREAM, None, None)
    if route.mode == "shadow":
        return Decision(UPSTREAM, route.model, None)
    if route.mode == "canary":
        share = _sticky_draw(route, user) if user else draw()
        if share >= route.weight:
            return Decision(UPSTREAM, None, route.model)
    rate = route.mirror if route.mirror is not None else mirror
    return Decision(route.model, UPSTREAM if draw() < rate else None, UPSTREAM)


def _sticky_draw(route: Route, user: str) -> float:
    """A number in [0, 1) fixed per (workload, model, user): the user's side stays while the weight does."""
    digest = hashlib.sha256(f"{route.workload_id}/{route.client_id}/{route.model}/{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class RouteTable:
    """Routes as a gateway replica reads them: from the store at most once per `ttl` seconds each."""

    def __init__(self, store: JobStore, *, ttl: float):
        self.store, self.ttl = store, ttl
        self._cache: dict[tuple[str, str], tuple[Route, float]] = {}

    def cached(self, workload_id: str, client_id: str) -> Route | None:
        """The route if read less than `ttl` ago (no store call: fine on an event loop), else None."""
        hit = self._cache.get((workload_id, client_id))
        return hit[0] if hit is not None and hit[1] > time.monotonic() else None

    def get(self, workload_id: str, client_id: str) -> Route:
        route = self.cached(workload_id, client_id)
        if route is None:
            route = get_route(self.store, workload_id, client_id)
            self._cache[(workload_id, client_id)] = (route, time.monotonic() + self.ttl)
        return route

    def forget(self, workload_id: str, client_id: str) -> None:
        self._cache.pop((workload_id, client_id), None)
