"""What the service answers is what /openapi.json says it answers: real requests over HTTP, each
answer's status declared for its operation, its media type declared, and its body valid against
the declared schema (JSON Schema 2020-12, as OpenAPI 3.1 uses, `$ref`s resolved in the document)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from sqlalchemy.exc import IntegrityError, OperationalError

from streams.store import StateUnavailable
from tests.conftest import NatsServer, eventually

TOKEN = "contract-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DOCUMENT_URI = "urn:tipstream:openapi"
NOW = "2026-11-26T09:00:00+01:00"
# Headers a client acts on (when to try again, how to authenticate): sent, they must be declared.
ACTED_ON = {"retry-after", "www-authenticate"}


# RFC 3339's date-time, as OpenAPI's `format: date-time` means it: a time with its UTC offset.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")
FORMATS = FormatChecker(["date", "uuid"])


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    return not isinstance(value, str) or bool(_RFC3339.fullmatch(value) and datetime.fromisoformat(value.upper()))


def _pointer(*parts: str) -> str:
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


class Contract:
    """Checks answers against the document; collects every disagreement, so one run shows them all."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self.registry = Registry().with_resource(DOCUMENT_URI, resource)
        self.problems: list[str] = []
        self.checked: set[tuple[str, str, str]] = set()

    def check(self, response: httpx.Response, path: str, method: str = "get") -> httpx.Response:
        where = f"{method.upper()} {path} -> {response.status_code}"
        operation = self.document["paths"].get(path, {}).get(method)
        if operation is None:
            self.problems.append(f"{where}: the document has no such operation")
            return response
        status = str(response.status_code)
        declared = operation.get("responses", {})
        if status not in declared:
            self.problems.append(f"{where}: status not declared (declared: {sorted(declared)}); body {response.text[:200]}")
            return response
        self.checked.add((method, path, status))
        headers = {name.lower() for name in declared[status].get("headers", {})}
        for header in headers - set(response.headers):
            self.problems.append(f"{where}: no {header} header, which the document declares")
        for header in ACTED_ON & set(response.headers) - headers:
            self.problems.append(f"{where}: a {header} header ({response.headers[header]!r}) the document does not declare")
        content = declared[status].get("content")
        media_type = response.headers.get("content-type", "").split(";")[0].strip()
        if not content:
            if response.content:
                self.problems.append(f"{where}: answers a {media_type} body, the document declares none")
            return response
        if media_type not in content:
            self.problems.append(f"{where}: answers {media_type!r}, the document declares {sorted(content)}")
            return response
        if "schema" not in content[media_type]:
            return response
        body = orjson.loads(response.content) if media_type == "application/json" else response.text
        ref = _pointer("paths", path, method, "responses", status, "content", media_type, "schema")
        validator = Draft202012Validator({"$ref": f"{DOCUMENT_URI}#{quote(ref, safe='/~')}"}, registry=self.registry,
                                         format_checker=FORMATS)
        for error in validator.iter_errors(body):
            self.problems.append(f"{where}: {error.json_path}: {error.message}")
        return response


def unavailable(user_id: str) -> None:
    raise StateUnavailable(user_id)


def raising(error: Exception) -> Callable[..., Awaitable[None]]:
    async def change(*_args: Any) -> None:
        raise error

    return change


def score_body(**changes: Any) -> dict[str, Any]:
    return {"user_id": "ana", "context": {"now": NOW},
            "candidates": [{"tip_id": "tip-focus-1", "category": "focus"}, {"tip_id": "tip-breaks-1"}], **changes}


async def post_score(http: httpx.AsyncClient, contract: Contract, content: bytes | None = None,
                     **changes: Any) -> httpx.Response:
    raw = content if content is not None else orjson.dumps(score_body(**changes))
    answer = await http.post("/score", content=raw, headers={"content-type": "application/json"})
    return contract.check(answer, "/score", "post")


async def test_every_answer_is_what_the_document_says(start_service, nc, tmp_path, monkeypatch) -> None:
    running = await start_service(admin_token=TOKEN, bootstrap_shadow_kind="logreg")
    js = nc.jetstream()
    await js.publish("signals.app.opened", orjson.dumps(
        {"id": "c-1", "type": "app.opened", "user_id": "ana", "ts": "2026-11-25T21:00:00+01:00", "data": {}}))
    await eventually(lambda: running.service.store.applied == 1)
    await eventually(lambda: running.service.ready)

    async with running.http() as http:
        document = (await http.get("/openapi.json")).json()
        for schema in document["components"]["schemas"].values():
            Draft202012Validator.check_schema(schema)
        contract = Contract(document)

        async def score(content: bytes | None = None, **changes: Any) -> httpx.Response:
            return await post_score(http, contract, content, **changes)

        assert (await score()).status_code == 200
        assert (await score(explore=False, profile_features={"open_tasks": 2})).status_code == 200
        refusals = {
            "unknown field": await score(extra=1),
            "no candidates": await score(candidates=[]),
            "101 candidates": await score(candidates=[{"tip_id": f"t-{i}"} for i in range(101)]),
            "the same tip twice": await score(candidates=[{"tip_id": "a"}, {"tip_id": "a"}]),
            "a wrong type": await score(user_id=7),
            "not JSON": await score(b"{"),
            "no body": await score(b""),
        }
        for what, answer in refusals.items():
            assert answer.status_code == 422, (what, answer.text)
        too_large = await score(b" " * (running.service.settings.score_max_body_bytes + 1))
        assert too_large.status_code == 413

        features = "/users/{user_id}/features"
        known = contract.check(await http.get("/users/ana/features", params={"at": NOW}), features)
        assert known.status_code == 200 and known.json()["known"] is True
        stranger = contract.check(await http.get("/users/nobody/features"), features)
        assert stranger.status_code == 200 and stranger.json()["known"] is False
        for bad in (await http.get("/users/ana/features", params={"at": "yesterday"}),
                    await http.get(f"/users/{'x' * 129}/features")):
            assert contract.check(bad, features).status_code == 422
        with monkeypatch.context() as patch:  # the user's state still to load, and the database away
            patch.setattr(running.service.store, "state_of", unavailable)
            assert contract.check(await http.get("/users/bo/features"), features).status_code == 503

        for path, url, status in [("/models", "/models", 200), ("/models/{version}", "/models/v1", 200),
                                  ("/models/{version}/card", "/models/v1/card", 200),
                                  ("/models/{version}", "/models/nope", 404),
                                  ("/models/{version}/card", "/models/nope/card", 404)]:
            assert contract.check(await http.get(url), path).status_code == status, url

        async def admin(path: str, url: str, body: Any = None, headers: dict[str, str] = AUTH) -> int:
            content = b"" if body is None else body if isinstance(body, bytes) else orjson.dumps(body)
            answer = await http.post(url, content=content, headers={**headers, "content-type": "application/json"})
            return contract.check(answer, path, "post").status_code

        promote, register = "/admin/models/{version}/promote", "/admin/models"
        assert await admin(promote, "/admin/models/v2/promote", headers={}) == 401
        assert await admin(promote, "/admin/models/v2/promote", headers={"Authorization": "Bearer guess"}) == 403
        assert await admin(promote, "/admin/models/v2/promote", {"actor": " "}) == 422
        assert await admin(promote, "/admin/models/v2/promote", b"{") == 422
        assert await admin(promote, "/admin/models/nope/promote") == 404
        assert await admin(register, "/admin/models", {"version": "v1"}) == 409
        assert await admin(register, "/admin/models", {"version": "v3", "kind": "svm"}) == 422
        assert await admin(register, "/admin/models", {"version": "v3", "params": {"l2": 0.01}}) == 200
        assert await admin("/admin/models/{version}/evaluate", "/admin/models/v3/evaluate") == 200
        assert await admin("/admin/models/{version}/evaluate", "/admin/models/nope/evaluate") == 404
        assert await admin("/admin/models/{version}/shadow", "/admin/models/v3/shadow", {"actor": "alice"}) == 200
        assert await admin(promote, "/admin/models/v2/promote", {"note": "contract"}) == 200
        assert await admin(promote, "/admin/models/v2/promote") == 409  # the champion already
        assert await admin("/admin/rollback", "/admin/rollback") == 200
        assert await admin("/admin/rollback", "/admin/rollback") == 409  # nothing left to roll back to
        assert await admin("/admin/models/{version}/retire", "/admin/models/v1/retire") == 409  # the champion
        assert await admin("/admin/models/{version}/retire", "/admin/models/v2/retire") == 200
        assert await admin("/admin/models/{version}/shadow", "/admin/models/v1/shadow") == 409  # the champion
        assert await admin(register, "/admin/models", {"version": "-x"}) == 422
        for error, status in [(IntegrityError("INSERT", None, Exception("a trigger refused it")), 500),
                              (OperationalError("INSERT", None, Exception("connection lost")), 503)]:
            with monkeypatch.context() as patch:  # the database refusing the change, and away
                patch.setattr(running.service.lineup, "promote", raising(error))
                assert await admin(promote, "/admin/models/v3/promote") == status

        forget = "/admin/users/{user_id}/forget"

        async def asked(url: str, headers: dict[str, str] = AUTH) -> int:
            return contract.check(await http.get(url, headers=headers), forget).status_code

        assert await admin(forget, "/admin/users/forget-me/forget", headers={}) == 401
        assert await asked("/admin/users/forget-me/forget", headers={}) == 401
        assert await asked("/admin/users/forget-me/forget", headers={"Authorization": "Bearer guess"}) == 403
        assert await asked("/admin/users/forget-me/forget") == 404
        assert await admin(forget, f"/admin/users/{'x' * 129}/forget") == 422
        assert await asked("/admin/users/%FF/forget") == 422
        assert await admin(forget, "/admin/users/forget-me/forget", {"actor": "dpo"}) == 202
        assert await asked("/admin/users/forget-me/forget") == 200

        assert contract.check(await http.get("/healthz"), "/healthz").status_code == 200
        assert contract.check(await http.get("/readyz"), "/readyz").status_code == 200
        assert contract.check(await http.get("/metrics"), "/metrics").status_code == 200

    # Decisions' rows waiting for a checkpoint: /score refuses to serve more (with Retry-After).
    # Its own NATS: the first service's decisions in DECISIONS would be rows for it to write too.
    nats = NatsServer(tmp_path / "nats-backed-up")
    nats.start()
    try:
        await backed_up_and_not_ready(start_service, contract, nats, tmp_path)
    finally:
        nats.stop()
    assert not contract.problems, "\n".join(contract.problems)
    driven = {(method, path) for method, path, _ in contract.checked}
    documented = {(method, path) for path, operations in document["paths"].items() for method in operations}
    assert documented <= driven, f"operations this test never asks: {sorted(documented - driven)}"


async def backed_up_and_not_ready(start_service: Any, contract: Contract, nats: NatsServer, tmp_path: Path) -> None:
    backed_up = await start_service(data_dir=tmp_path / "backed-up", nats_url=nats.url, max_unwritten_decisions=1,
                                    checkpoint_every_s=600)
    async with backed_up.http() as http:
        assert (await post_score(http, contract)).status_code == 200
        # Its row waits once JetStream has acknowledged the decision: asked before, /score still served.
        await eventually(lambda: backed_up.service.decision_log.backlog >= 1)
        assert (await post_score(http, contract)).status_code == 503

        # NATS away: not ready, in the same shape.
        nats.stop()
        await eventually(lambda: not backed_up.service.ready)
        assert contract.check(await http.get("/readyz"), "/readyz").status_code == 503
