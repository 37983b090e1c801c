"""Model registry and erasure routes: registry reads are open, the rest need `Authorization: Bearer
<TIPSTREAM_ADMIN_TOKEN>`.

- `GET /models`, `GET /models/{version}` (JSON, with the card), `GET /models/{version}/card` (Markdown).
- `POST /admin/models` `{version, kind?, params?, actor?, note?}`: register (trained over the log;
  `kind` defaults to logreg).
- `POST /admin/models/{version}/shadow|promote|retire|evaluate` `{actor?, note?}`.
- `POST /admin/rollback` `{champion?, actor?, note?}`: `champion`, the version rolled back from, makes a
  second rollback meant for it (two at once, or one sent again) a 409 rather than a second step back.
- `POST /admin/users/{user_id}/forget` `{actor?}`: 202, a request to forget the user (app/erasure.py);
  `GET` the same path: where it is (404: none asked).

Without a configured token every change is refused (403) with the setting to set; a missing
header is 401, a wrong token 403. Registry refusals map to 404 / 409 / 422 with the
registry's own message (it names the CLI command that fixes it); the database away (or a setting of its, a right
its user lacks, tables not this release's, a full disk: named, with the fix), to 503 with Retry-After; any other
refusal of the database's (an IntegrityError, a DataError), to 500 with its first line: no wait mends it. A
change after another service took this one's database lock, to 503 naming it, without Retry-After: this one stops.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import shlex
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from app.db import NOT_AN_OUTAGE, away, disk_full, one_line, refusal, refused_by_setting
from app.lineup import DatabaseNotOurs
from app.request_body import ClientGone, field_path, not_utf8, path_is_utf8, read_body
from app.score_endpoint import refusal_by_headers
from models.registry import RegistryError
from streams.events import HALF_A_PAIR, has_lone_surrogate, is_user_id, lenient_loads, text_path

STATUS = {"not_found": 404, "conflict": 409, "invalid": 422}


def _json(status: int, body: Any) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _refusal(request: Request) -> Response | None:
    """None when the request carries the admin token; else the 401/403 answer."""
    token = request.app.state.service.settings.admin_token
    # Stripped, as the header's token is: one read from a file ends with a newline, and then no
    # request ever matched it (and the CLI's request failed with a traceback showing it).
    secret = token.get_secret_value().strip() if token is not None else ""
    if not secret:
        # Said to a client that sent a token, often the CLI with its own TIPSTREAM_ADMIN_TOKEN set: the
        # setting to fix is the server's, which only a restart reads.
        return _json(403, {"error": "admin requests (registry changes, forgetting users) are disabled on this server: "
                                    "restart it with TIPSTREAM_ADMIN_TOKEN set to a secret of 16 characters or more, "
                                    "and send that secret as `Authorization: Bearer <token>`", "field": None})
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        # Also said to a status read (GET of a request to forget), which is no change.
        response = _json(401, {"error": "admin requests need `Authorization: Bearer <TIPSTREAM_ADMIN_TOKEN>`",
                               "field": "Authorization"})
        response.headers["WWW-Authenticate"] = 'Bearer realm="tipstream admin"'
        return response
    if not hmac.compare_digest(given.strip().encode(), secret.encode()):
        return _json(403, {"error": "the bearer token is not TIPSTREAM_ADMIN_TOKEN", "field": "Authorization"})
    return None


def _storable(text: str) -> str:
    # PostgreSQL cannot store a NUL in text: the change failed as it was saved, a bare 500.
    if "\x00" in text:
        raise ValueError("must not contain the NUL character (\\u0000); the database cannot store it")
    return text


def _someone(actor: str) -> str:
    # The registry refuses a blank actor too, but a registration only after it has trained (seconds).
    if not actor.strip():
        raise ValueError("must name who makes the change, not be blank")
    return actor


Actor = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_storable), AfterValidator(_someone)]


class ChangeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    actor: Actor = "admin-api"
    note: Annotated[str, Field(max_length=1000), AfterValidator(_storable)] = ""


class ForgetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    actor: Actor = "admin-api"  # kept with the request: no note, which could hold what the request erases


_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _version_name(name: str) -> str:
    # Every later change names the version in a URL path; a name no path can carry could never
    # be promoted or retired, and versions are immutable.
    if not _VERSION_NAME.fullmatch(name):
        raise ValueError("a version name is letters, digits, '.', '_' and '-', starting with a letter or digit")
    return name


class RegisterBody(ChangeBody):
    version: Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_version_name)]
    kind: str = "logreg"
    params: dict[str, Any] = Field(default_factory=dict)


class RollbackBody(ChangeBody):
    # Rollback is the one change that, made twice, does something else: two operators undoing one bad
    # promotion at once rolled back past the champion before it too.
    champion: Annotated[str, Field(min_length=1, max_length=64)] | None = None


# A change's body is a version's name, parameters and a note: a few KB. Read whole, 5 MB was parsed.
ADMIN_MAX_BODY_BYTES = 1 << 20


class _NoAnswer(Response):
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        pass


_NO_ANSWER = _NoAnswer()


def _query_refusal(request: Request, then: str = "") -> Response | None:
    """The 422 of a request that takes no query string and was given one (its first parameter named), or None."""
    if not request.scope.get("query_string"):
        return None
    name = next(iter(request.query_params), "")
    field = name or "query"
    return _json(422, {"error": f"{field}: " + (f"unknown query parameter {name!r}; " if name else "")
                       + f"{request.method} {request.url.path} takes no query string{then}", "field": field})


def _admin(action: Callable[[Request, Any], Awaitable[Any]], body: type[BaseModel] = ChangeBody,
           status: int = 200) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        refused = _refusal(request)
        if refused is not None:
            return refused
        try:
            raw = await read_body(request.receive, ADMIN_MAX_BODY_BYTES)
        except ClientGone:  # gone before its body ended: nothing changed, and no one to answer
            return _NO_ANSWER
        if raw is None:
            return _json(413, {"error": f"body: larger than {ADMIN_MAX_BODY_BYTES} bytes", "field": "body"})
        # As /score refuses one (its check; the length is read within the bound already): `curl -d` sends a
        # form's type, and any type was read as JSON.
        if raw and (not_json := refusal_by_headers(request.scope, ADMIN_MAX_BODY_BYTES)) is not None:
            return _json(*not_json)
        # As /score refuses one: ignored, `?dry_run=true` made the change, `?champion=v1` an unguarded rollback.
        if (queried := _query_refusal(request, ': its request is the JSON body (e.g. {"note": "why"})')) is not None:
            return queried
        try:
            parsed = body.model_validate_json(raw or b"{}")
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            field = field_path(first["loc"])
            message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own words
            if first["type"] == "json_invalid":
                message = not_utf8(raw) or message
                # Half a surrogate pair, as JSON.stringify writes a text cut inside an emoji: named by its field,
                # as /score names it, not "body: Invalid JSON: lone leading surrogate in hex escape".
                if "surrogate" in message or "hex escape" in message:
                    where = text_path(lenient_loads(raw), has_lone_surrogate)
                    if where:
                        field, message = where, HALF_A_PAIR
            return _json(422, {"error": f"{field}: {message}", "field": field})
        try:
            result = await action(request, parsed)
        except RegistryError as error:
            return _json(STATUS.get(error.code, 409), {"error": str(error), "field": error.field})
        except BadUserId as error:
            return _json(422, {"error": f"user_id: {error}", "field": "user_id"})
        except DatabaseNotOurs as error:  # no Retry-After: this service stops, and another holds the database
            return _json(503, {"error": str(error), "field": None})
        except SQLAlchemyError as error:  # a change is swapped in only once saved (see Lineup._change)
            return _database_refusal(request, error)
        return _json(status, result)

    endpoint.__doc__ = _admin_doc(action.__doc__ or "", body)
    return endpoint


def _database_refusal(request: Request, error: SQLAlchemyError) -> Response:
    """The answer to a change the database did not save: 503 with Retry-After only for what a wait mends."""
    engine = getattr(request.app.state.service, "engine", None)
    setting = refused_by_setting(error, engine.url.username if engine is not None else None)
    first_line = one_line(error, engine.url if engine is not None else "postgresql://")  # a full disk: where to free
    # A refusal by the operator's setting (a statement_timeout shorter than a registration's read of
    # the decision log, say) read as an outage, to be waited out, which changed nothing.
    if setting is not None:
        why = f"the database refused it ({first_line}): {setting}; nothing changed"
    elif disk_full(error):  # "try again once it is back" sent the operator to wait for a database that is up
        why = f"{first_line}, then try again; nothing changed"
    elif away(error):
        why = f"the database is away ({type(error).__name__}); nothing changed: try again once it is back"
    else:  # an IntegrityError or DataError (a trigger or constraint the operator added, or a bug of ours) was told
        # as an outage, with Retry-After: every retry met the same refusal.
        return _json(500, {"error": f"{refusal(error)}; nothing changed. {NOT_AN_OUTAGE}", "field": None})
    response = _json(503, {"error": why, "field": None})
    response.headers["Retry-After"] = "5"
    return response


_REFUSALS = {
    401: {"description": "no bearer token", "headers": {"WWW-Authenticate": {
        "description": "the scheme to authenticate with", "schema": {"type": "string"}}}},
    403: {"description": "wrong token, or TIPSTREAM_ADMIN_TOKEN unset"},
    413: {"description": f"the body is larger than {ADMIN_MAX_BODY_BYTES} bytes; nothing changed"},
    415: {"description": "a body not sent as JSON: send it with `Content-Type: application/json`; nothing changed"},
    422: {"description": "a bad body, or a query string (which a change does not take); the field named; nothing "
                         "changed"},
    500: {"description": "the database refused the change for something no wait mends and no setting explains (an "
                         "IntegrityError or DataError: a constraint or trigger added to tipstream's tables, or a bug; "
                         "its first line named); nothing changed"},
    503: {"description": "the database is away, or a setting of its, a right its user lacks, or tables not this "
                         "release's refused the change (named, with its fix); or another service took this one's "
                         "database lock (named; no Retry-After: this one stops); "
                         "nothing changed", "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
}


def _admin_doc(doc: str, body: type[BaseModel]) -> str:
    """The action's OpenAPI description (YAML), with what every change shares: the token, the body
    and their refusals; the action's own answers win."""
    spec = yaml.safe_load(doc)
    required = any(field.is_required() for field in body.model_fields.values())  # else an empty body will do
    spec["security"] = [{"admin": []}]
    spec["requestBody"] = {"required": required, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}}
    spec["responses"] = dict(sorted({**_REFUSALS, **spec["responses"]}.items()))
    return yaml.safe_dump(spec, sort_keys=False)


def _lineup(request: Request) -> Any:
    return request.app.state.service.lineup


async def list_models(request: Request) -> Response:
    """
    responses:
      200:
        description: 'every version: kind, role (champion, shadow, retired or null), rewards learned'
        content:
          application/json:
            schema: {$ref: '#/components/schemas/ModelList'}
      422: {description: 'a query string, which this read does not take (ignored, it answered as if not given)'}
    """
    if (queried := _query_refusal(request)) is not None:
        return queried
    lineup = _lineup(request)
    return _json(200, {"champion": lineup.champion_version, "shadow": lineup.shadow_version,
                       "models": lineup.listing()})


async def get_model(request: Request) -> Response:
    """
    responses:
      200:
        description: 'the version, its parameters, role and model card'
        content:
          application/json:
            schema: {$ref: '#/components/schemas/ModelVersion'}
      404: {description: no such version}
      422: {description: 'a query string, which this read does not take'}
    """
    if (queried := _query_refusal(request)) is not None:
        return queried
    try:
        return _json(200, _lineup(request).describe(request.path_params["version"]))
    except RegistryError as error:
        return _json(STATUS[error.code], {"error": str(error), "field": error.field})


async def get_card(request: Request) -> Response:
    """
    responses:
      200:
        description: the model card as Markdown
        content:
          text/markdown: {schema: {type: string}}
      404: {description: no such version}
      422: {description: "a query string, which this read does not take (`?format=json` answered Markdown)"}
    """
    if (queried := _query_refusal(request)) is not None:
        return queried
    try:
        return PlainTextResponse(_lineup(request).registry.card_markdown(request.path_params["version"]),
                                 media_type="text/markdown")
    except RegistryError as error:
        return _json(STATUS[error.code], {"error": str(error), "field": error.field})


async def _register(request: Request, body: RegisterBody) -> Any:
    """
    responses:
      200:
        description: 'registered; trained over the decision log, card filled in'
        content:
          application/json:
            schema: {$ref: '#/components/schemas/ModelVersion'}
      409: {description: 'the version exists, or one whose name differs only in case (field: version)'}
      422: {description: 'bad parameters, or a model that overflows learning the log (field: params)'}
    """
    mv = await _lineup(request).register(body.version, body.kind, body.params, body.actor, body.note)
    return _lineup(request).describe(mv.version)


def _role_change(method: str) -> Callable[[Request, ChangeBody], Awaitable[Any]]:
    async def action(request: Request, body: ChangeBody) -> Any:
        lineup = _lineup(request)
        await getattr(lineup, method)(request.path_params["version"], body.actor, body.note)
        return {"champion": lineup.champion_version, "shadow": lineup.shadow_version,
                "history": [e.to_dict() for e in lineup.registry.history[-5:]]}

    action.__doc__ = f"""
    responses:
      200:
        description: '{method} done; the roles now and the latest rollout history'
        content:
          application/json:
            schema: {{$ref: '#/components/schemas/Roles'}}
      404: {{description: no such version}}
      409: {{description: refused by the registry rules (the message says what to do)}}
    """
    return action


async def _rollback(request: Request, body: RollbackBody) -> Any:
    """
    responses:
      200:
        description: 'the previous champion is back; the roles now and the latest rollout history'
        content:
          application/json:
            schema: {$ref: '#/components/schemas/Roles'}
      409: {description: 'nothing to roll back to, or `champion` is not the champion any more (field: champion)'}
    """
    lineup = _lineup(request)
    restored = await lineup.rollback(body.actor, body.note, body.champion)
    return {"champion": restored, "shadow": lineup.shadow_version,
            "history": [e.to_dict() for e in lineup.registry.history[-5:]]}


async def _evaluate(request: Request, body: ChangeBody) -> Any:
    """
    responses:
      200:
        description: 'the refreshed model card: progressive validation, fairness, and off-policy value over the log'
        content:
          application/json:
            schema: {$ref: '#/components/schemas/ModelCard'}
      404: {description: no such version}
      422: {description: "a bad body, or the version's model overflows learning the log (field: params); nothing changed"}
    """
    card = await _lineup(request).evaluate(request.path_params["version"], body.actor, body.note)
    return card.to_dict()


class BadUserId(ValueError):
    pass


def _user_id(request: Request) -> str:
    user_id = request.path_params["user_id"]
    # As an event's user_id may be. The server decodes a percent-encoded path with errors replaced:
    # "%FF" named the user "\ufffd", who would have been forgotten instead. A "\ufffd" sent as UTF-8
    # is the user's own (an event's user_id may hold one), and is taken: refused as well, that user
    # could never be forgotten.
    if not is_user_id(user_id) or ("\ufffd" in user_id and not path_is_utf8(request.scope)):
        raise BadUserId("a user id is 1 to 128 characters of UTF-8 (percent-encoded in the path), without NUL")
    return user_id


def _eraser(request: Request) -> Any:
    eraser = request.app.state.service.eraser
    if eraser is None:
        raise RegistryError("the service is still starting: try again in a moment", "conflict", None)
    return eraser


async def _forget(request: Request, body: ForgetBody) -> Any:
    """
    responses:
      202:
        description: "the request is saved and under way; GET this path for where it is. Their state, the
          learner's decisions and own model features go within a second; their messages in the streams next"
        content:
          application/json:
            schema: {$ref: '#/components/schemas/Erasure'}
      409: {description: 'the service is still starting: nothing saved, try again in a moment'}
      422: {description: 'the user id is longer than 128 characters, holds a NUL or is not UTF-8'}
    """
    user_id, eraser = _user_id(request), _eraser(request)
    # Saved in the 10 s before the lock's check, it went over the rows of a service that took the lock meanwhile,
    # and was answered 202 by one that stops.
    await eraser.ours("nothing saved: this service stops, ask the service that holds the database lock to forget "
                      "the user")
    row = await asyncio.to_thread(eraser.request, user_id, body.actor)
    eraser.wake()
    return row


async def forget_status(request: Request) -> Response:
    """
    security: [{admin: []}]
    responses:
      200:
        description: "the request to forget the user: requested, dropped (state and rows gone, messages next) or done"
        content:
          application/json:
            schema: {$ref: '#/components/schemas/Erasure'}
      401:
        description: no bearer token
        headers:
          WWW-Authenticate: {description: the scheme to authenticate with, schema: {type: string}}
      403: {description: 'wrong token, or TIPSTREAM_ADMIN_TOKEN unset'}
      404: {description: no request to forget this user}
      409: {description: the service is still starting}
      422: {description: 'the user id is longer than 128 characters, holds a NUL or is not UTF-8; or a query string, which this read does not take'}
      500: {description: 'the database refused the read for something no wait mends (its first line named)'}
      503:
        description: 'the database is away, or a setting of its refused the read (named, with its fix)'
        headers:
          Retry-After: {schema: {type: integer}, description: seconds}
    """
    refused = _refusal(request) or _query_refusal(request)
    if refused is not None:
        return refused
    try:
        user_id, eraser = _user_id(request), _eraser(request)
    except BadUserId as error:
        return _json(422, {"error": f"user_id: {error}", "field": "user_id"})
    except RegistryError as error:
        return _json(409, {"error": str(error), "field": None})
    try:
        row = await asyncio.to_thread(eraser.status, user_id)
    except SQLAlchemyError as error:  # the database away was a bare 500, where a change gets a 503 with Retry-After
        return _database_refusal(request, error)
    if row is None:
        return _json(404, {"error": f"no request to forget user {user_id!r}: POST to this path makes one "
                                    f"(`tipstream users forget {shlex.quote(user_id)}`)",
                           "field": "user_id"})
    return _json(200, row)


def routes() -> list[Route]:
    return [
        Route("/models", list_models, methods=["GET"]),
        Route("/models/{version}", get_model, methods=["GET"]),
        Route("/models/{version}/card", get_card, methods=["GET"]),
        Route("/admin/models", _admin(_register, RegisterBody), methods=["POST"]),
        Route("/admin/models/{version}/shadow", _admin(_role_change("set_shadow")), methods=["POST"]),
        Route("/admin/models/{version}/promote", _admin(_role_change("promote")), methods=["POST"]),
        Route("/admin/models/{version}/retire", _admin(_role_change("retire")), methods=["POST"]),
        Route("/admin/models/{version}/evaluate", _admin(_evaluate), methods=["POST"]),
        Route("/admin/rollback", _admin(_rollback, RollbackBody), methods=["POST"]),
        Route("/admin/users/{user_id:text}/forget", _admin(_forget, ForgetBody, status=202), methods=["POST"]),
        Route("/admin/users/{user_id:text}/forget", forget_status, methods=["GET"]),
    ]
