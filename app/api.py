"""The HTTP API (Starlette). Handlers read the online store; they never write state."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.schemas import SchemaGenerator

from app import admin
from app import openapi as openapi_document
from app.bootstrap import Service
from app.host_check import HostCheck, allowed_names
from app.metrics import METRICS
from app.request_body import path_is_utf8
from app.score_endpoint import UNAVAILABLE, ScoreEndpoint
from app.score_request import TIME_WITH_OFFSET
from app.settings import Settings
from app.thaw import load_state
from streams.events import EventTime, is_user_id
from streams.features import evaluate
from streams.fold import to_ms
from streams.store import StateUnavailable

_AT = TypeAdapter(EventTime)


class _AnyText(PathConvertor):
    """A path parameter that is any text: a '/', as with `path`, and a line break too. `path`'s
    `.*` stops at a "\\n", which an event's user id may hold: such a user's features were a 404."""

    regex = r"[\s\S]*"


register_url_convertor("text", _AnyText())

schemas = SchemaGenerator(openapi_document.BASE)


NOT_BUILT_YET = '; tip text is not built yet (docs/operations.md, "Not built yet")'


def _error(status: int, field: str | None, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


async def _http_error(request: Request, error: Exception) -> Response:
    """Starlette's own refusals (no such path, a method the path does not take) in the API's
    error shape, with what the path does take."""
    assert isinstance(error, HTTPException)
    message = f"{request.method} {request.url.path}: {error.detail}"
    if error.status_code == 404 and (bare := _slashless(request)) is not None:
        message += f"; the path is {bare}, without the trailing slash"
    elif error.status_code == 404:
        # A bare "Not Found" left a first look (the address `tipstream run` prints, in a browser) nothing to go on,
        # and /generate, in the product design, read as a mistyped path.
        message += (NOT_BUILT_YET if request.scope["path"] == "/generate"
                    else "; the API's operations are listed by GET /openapi.json")
    if error.headers and "Allow" in error.headers:
        message += f"; this path takes {error.headers['Allow']}"
    return JSONResponse({"error": message, "field": None}, status_code=error.status_code, headers=error.headers)


def _slashless(request: Request) -> str | None:
    """The path without its trailing slash(es), when that is one of the API's."""
    path = request.scope["path"]
    if path == "/" or not path.endswith("/"):
        return None
    scope = {**request.scope, "path": path.rstrip("/")}
    return scope["path"] if any(route.matches(scope)[0] is not Match.NONE for route in request.app.routes) else None


async def healthz(request: Request) -> Response:
    """
    responses:
      200:
        description: the process is up
        content:
          application/json:
            schema: {type: object, properties: {status: {const: ok}}}
    """
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """
    responses:
      200: &ready
        description: caught up with every stream
        content:
          application/json:
            schema:
              type: object
              required: [ready, streams]
              properties:
                ready: {type: boolean}
                streams:
                  type: object
                  additionalProperties:
                    type: object
                    properties:
                      caught_up: {type: boolean}
                      lag: {type: integer}
                      replaying:
                        description: 'why the stream is read again from its first message while the service runs (made anew, or an older copy of its store): not caught up until that replay is, as at a start; null otherwise'
                        type: [string, 'null']
                checkpoint:
                  description: 'whether state is being saved: a failing checkpoint, or one not committed after 30 s (a database that hangs), does not make the service unready (it serves from memory, and events are safe in the streams), but says why here'
                  type: [object, 'null']
                  properties: {ok: {type: boolean}, last_error: {type: [string, 'null']}, since_last_ok_s: {type: number}}
                nats_store:
                  description: 'the embedded nats-server only (null with NATS_URL): whether its store takes writes; not ok while its disk is full, which does not make the service unready either'
                  type: [object, 'null']
                  properties: {ok: {type: boolean}, last_error: {type: [string, 'null']}, free_bytes: {type: [integer, 'null']}}
                nats:
                  description: 'whether the connection to NATS is up and, while it is not, the error NATS gave last (connection refused, no greeting from a server that hangs, credentials refused): not connected, the service is unready whatever the streams say'
                  type: object
                  properties: {connected: {type: boolean}, last_error: {type: [string, 'null']}}
      503:
        <<: *ready
        description: 'still catching up, or NATS is away'
    """
    service: Service = request.app.state.service
    streams = {i.spec.name: {"caught_up": i.current, "lag": i.lag, "replaying": i.replaying} for i in service.ingests}
    checkpoint = service.checkpointer.health() if service.checkpointer is not None else None
    nats_store = service.embedded.health() if service.embedded is not None else None
    body = {"ready": service.ready, "streams": streams, "checkpoint": checkpoint, "nats_store": nats_store,
            "nats": service.nats_connection.health()}
    return JSONResponse(body, status_code=200 if service.ready else 503)


async def metrics(request: Request) -> Response:
    """
    responses:
      200:
        description: Prometheus text format
        content:
          text/plain: {schema: {type: string}}
    """
    store = request.app.state.service.store
    METRICS.users.set(len(store.users))
    METRICS.users_dormant.set(len(store.dormant))
    return Response(generate_latest(METRICS.registry), media_type=CONTENT_TYPE_LATEST)


async def user_features(request: Request) -> Response:
    """
    parameters:
      - {name: user_id, in: path, required: true, schema: {type: string, minLength: 1, maxLength: 128}}
      - {name: at, in: query, required: false, schema: {type: string, format: date-time},
         description: 'evaluate at this time, an ISO 8601 time with a UTC offset (its + written %2B); default now'}
    responses:
      200:
        description: 'every profile feature with value, age, freshness and fallback flags; a user never seen: known false, every value a fallback'
        content:
          application/json:
            schema: {$ref: '#/components/schemas/UserFeatures'}
      422: {description: '`at` is not a time with a UTC offset or is given twice (or a query parameter other than `at` is given), or the user id is longer than 128 characters, holds a NUL or is not UTF-8'}
      503:
        description: "the user's state is still to be loaded from the database, which is away"
        headers:
          Retry-After: {schema: {type: integer}, description: seconds}
    """
    user_id = request.path_params["user_id"]
    # The server decodes a percent-encoded path with errors replaced: "%FF" asked for the user "\ufffd".
    if "\ufffd" in user_id and not path_is_utf8(request.scope):
        return _error(422, "user_id", "the user id is not UTF-8 once percent-decoded (encode its text as UTF-8, "
                                      "then percent-encode those bytes)")
    # What an event's user_id may be; a NUL failed PostgreSQL's read. Empty: "/users//features".
    if not is_user_id(user_id):
        return _error(422, "user_id", f"a user id is 1 to 128 characters without NUL, got {len(user_id)} characters"
                      + (" with a NUL" if "\x00" in user_id else ""))
    # /score refuses a field it does not know; so does this: `?as_of=` answered as of now, silently.
    unknown = sorted(set(request.query_params) - {"at"})
    if unknown:
        return _error(422, unknown[0], f"unknown query parameter {unknown[0]!r}; this endpoint takes only 'at', "
                                       f"e.g. ?at=2026-11-26T09:00:00%2B01:00")
    given = request.query_params.getlist("at")
    if len(given) > 1:  # the last one was taken, "?at=nonsense&at=<a time>" a 200 as of that time
        return _error(422, "at", f"'at' is given {len(given)} times; give it once")
    raw_at = given[0] if given else None
    if raw_at is None:
        at = datetime.now(UTC)
    else:
        try:
            at = _AT.validate_python(raw_at)
        except ValidationError as error:
            if error.errors()[0]["type"] in ("greater_than_equal", "less_than_equal"):  # it has an offset
                return _error(422, "at", f"'at' must be between 0001-01-01 and 9999-12-31 in UTC, got {raw_at!r}")
            hint = " (a '+' in a query string reads as a space: write it %2B)" if " " in raw_at else ""
            return _error(422, "at", f"'at' must be {TIME_WITH_OFFSET}, got {raw_at!r}{hint}")
    store = request.app.state.service.store
    try:
        if store.in_checkpoint_only(user_id):
            await load_state(store, user_id)
        state = store.state_of(user_id)
    except StateUnavailable:
        return JSONResponse(UNAVAILABLE, status_code=503, headers={"Retry-After": "5"})
    values = evaluate(state, to_ms(at))
    return JSONResponse({
        "user_id": user_id,
        "at": at.isoformat(),
        "known": state is not None,
        "features": {
            name: {"value": v.value, "age_s": v.age_s, "fresh": v.fresh, "fallback": v.fallback}
            for name, v in values.items()
        },
    })


async def openapi(request: Request) -> Response:
    # Starlette's OpenAPIResponse renders YAML; the path promises JSON.
    return JSONResponse(openapi_document.complete(schemas.get_schema(routes=request.app.routes)))


def create_app(settings: Settings, service: Service | None = None, *, started: bool = False) -> Starlette:
    """`started`: the service is started already, and the lifespan only stops it (`tipstream run`
    starts it first, to tell a failed start as a message rather than uvicorn's traceback)."""
    service = service or Service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not started:
            await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(
        routes=[
            # Routes are matched in order: the hot path is tried first.
            Route("/score", ScoreEndpoint(), methods=["POST"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            # `text`: a user id may hold a '/' ("org/42"), which the default convertor stops at, or a
            # line break, which `path` stops at.
            Route("/users/{user_id:text}/features", user_features),
            *admin.routes(),
            Route("/openapi.json", openapi, include_in_schema=False),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},
        middleware=[Middleware(HostCheck, allowed=allowed_names(settings.host, settings.allowed_hosts.split(",")))],
    )
    # Starlette answered a trailing slash with a 307 to the Host header's address and no body:
    # curl printed nothing, and a client that does not follow redirects got no answer to read.
    app.router.redirect_slashes = False
    app.state.service = service
    return app

