"""POST /score over real HTTP on a running service: answers, validation, the decision log, features, shadow."""

from __future__ import annotations

import asyncio
import gzip
import os
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import nats
import orjson
import pytest
import sqlalchemy as sa

from app import db
from app.metrics import METRICS
from streams.features import FEATURE_NAMES
from tests.conftest import dead_lettered, eventually

NOW = "2026-11-26T09:00:00+01:00"


def candidates(n: int) -> list[dict[str, Any]]:
    return [{"tip_id": f"tip-{i}", "category": ("focus", "breaks")[i % 2]} for i in range(n)]


def body(**changes: Any) -> dict[str, Any]:
    return {"user_id": "u-1", "candidates": candidates(3), "context": {"now": NOW}, **changes}


async def decisions_in_stream(js: Any) -> int:
    return (await js.stream_info("DECISIONS")).state.messages


async def test_an_answer_ranks_every_candidate_and_is_logged_once(start_service, nc, database_url) -> None:
    running = await start_service(database_url=database_url, checkpoint_every_s=0.1)
    async with running.http() as http:
        response = await http.post("/score", json=body(candidates=candidates(10)))
    assert response.status_code == 200
    answer = response.json()
    assert set(answer) == {"decision_id", "model_version", "ranked", "features", "caller_features"}
    assert answer["model_version"] == "v1"
    assert sorted(r["tip_id"] for r in answer["ranked"]) == sorted(c["tip_id"] for c in candidates(10))
    assert sum(r["propensity"] for r in answer["ranked"]) == pytest.approx(1.0)
    assert all(0.0 <= r["score"] <= 1.0 for r in answer["ranked"])
    features = answer["features"]
    assert features["hour_of_day"] == 9 and features["day_of_week"] == 3  # Thursday, in the request's offset
    assert features["utc_offset_min"] == 60 and features["is_new_user"] is True
    assert set(FEATURE_NAMES) <= set(features)

    # The decision event, with the id as Nats-Msg-Id, and its tip_scores row.
    js = nc.jetstream()
    await eventually(lambda: decisions_in_stream(js))
    sub = await js.pull_subscribe("decisions.>", stream="DECISIONS")
    [message] = await sub.fetch(1, timeout=5)
    logged = orjson.loads(message.data)
    assert message.subject == "decisions.score" and message.headers["Nats-Msg-Id"] == answer["decision_id"]
    assert logged["id"] == answer["decision_id"] and logged["features"] == features
    assert [r["tip_id"] for r in logged["ranked"]] == [r["tip_id"] for r in answer["ranked"]]
    assert all("model_score" in r and "category" in r for r in logged["ranked"])

    engine = sa.create_engine(database_url)

    def row() -> Any:
        with engine.connect() as conn:
            return conn.execute(sa.text("select decision_id, user_id, model_version, tip_id, propensity, decision "
                                        "from tip_scores")).first()
    try:
        stored = await eventually(row)
    finally:
        engine.dispose()
    assert stored[:4] == (answer["decision_id"], "u-1", "v1", answer["ranked"][0]["tip_id"])
    assert stored[5] is None  # no reward yet: the event is in the stream only (above)

    # The learner holds it for its feedback, and says how much of its budget that takes.
    async with running.http() as http:
        metrics = (await http.get("/metrics")).text
    held = running.service.learner.joins.bytes
    assert held > len(message.data) and f"tipstream_join_cache_bytes {float(held)}" in metrics
    # And the champion's candidate features (10 tips and their categories) are cached for the next request.
    cached = running.service.lineup.champion.candidate_cache_items
    assert cached >= 10 and f"tipstream_candidate_cache_items {float(cached)}" in metrics



async def test_a_decision_in_any_offset_gets_its_row_and_checkpoints_go_on(start_service, nc, database_url) -> None:
    """`context.now` may carry any offset up to 23:59; SQLite reads one up to 14:59 and PostgreSQL up
    to 15:59, so a decision at +23:59 kept its `tip_scores` row, and every later checkpoint, from
    being written (each retried it with the rest)."""
    running = await start_service(database_url=database_url, checkpoint_every_s=0.1)
    async with running.http() as http:
        for now in ("2026-11-26T09:00:00+23:59", "2026-11-26T09:00:00-23:59"):
            assert (await http.post("/score", json=body(context={"now": now}))).status_code == 200
    engine = sa.create_engine(database_url)

    def created() -> list[datetime]:
        with engine.connect() as conn:
            found = conn.execute(sa.select(db.tip_scores.c.created_at)).scalars().all()
        return sorted((t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC) for t in found)
    try:
        stored = await eventually(lambda: len(created()) == 2 and created())
    finally:
        engine.dispose()
    assert stored == [datetime(2026, 11, 25, 9, 1, tzinfo=UTC), datetime(2026, 11, 27, 8, 59, tzinfo=UTC)]


HUGE = {"user_id": "u-1", "candidates": candidates(3), "context": {"tasks": ["x" * 200] * 1000}}
BAD: list[tuple[str, Any, int, str]] = [
    ("unknown field", body(mood="happy"), 422, "mood"),
    ("unknown candidate field", body(candidates=[{"tip_id": "a", "score": 1}]), 422, "candidates.0.score"),
    ("no candidates", body(candidates=[]), 422, "candidates"),
    ("101 candidates", body(candidates=candidates(101)), 422, "candidates"),
    ("duplicated tip ids", body(candidates=[{"tip_id": "a"}, {"tip_id": "b"}, {"tip_id": "a"}]), 422,
     "candidates.2.tip_id"),
    ("tip id not a string", body(candidates=[{"tip_id": 7}]), 422, "candidates.0.tip_id"),
    ("tip id too long", body(candidates=[{"tip_id": "t" * 129}]), 422, "candidates.0.tip_id"),
    ("user id missing", {"candidates": candidates(1)}, 422, "user_id"),
    ("explore not a bool", body(explore="yes"), 422, "explore"),
    ("now without offset", body(context={"now": "2026-11-26T09:00:00"}), 422, "context.now"),
    ("now past year 9999 in UTC", body(context={"now": "9999-12-31T23:00:00-02:00"}), 422, "context.now"),
    ("now before year 1 in UTC", body(context={"now": "0001-01-01T00:00:00+01:00"}), 422, "context.now"),
    # pydantic read a number as Unix time in UTC: the user's local hour and weekday silently UTC's.
    ("now in Unix time", body(context={"now": 1795694400}), 422, "context.now"),
    ("now in Unix time as text", body(context={"now": "1795694400.5"}), 422, "context.now"),
    ("a task neither an object nor a string", body(context={"tasks": [{"id": 1}, 7]}), 422, "context.tasks.1"),
    ("a task string too long", body(context={"tasks": ["t" * 257]}), 422, "context.tasks.0"),
    ("candidate feature a list", body(candidates=[{"tip_id": "a", "features": {"len": [1]}}]), 422,
     "candidates.0.features.len"),
    ("candidate feature named like a server one", body(candidates=[{"tip_id": "a", "features": {"hour_of_day": 3}}]),
     422, "candidates.0.features.hour_of_day"),
    # Read by the model as another user's own weight ('user_id_u-2'), a tip's or a category's: trained on
    # this user's reactions, and brought back after that user was forgotten.
    ("candidate feature read as a user's weight", body(candidates=[{"tip_id": "a", "features": {"user": "id_u-2"}}]),
     422, "candidates.0.features.user"),
    ("candidate feature read as a user's cross",  # 'user_id*category=u-2*focus': u-2's own, with focus
     body(candidates=[{"tip_id": "a", "features": {"user": "id*category=u-2*focus"}}]), 422, "candidates.0.features.user"),
    ("candidate feature named as a category's weight",
     body(candidates=[{"tip_id": "a", "features": {"category_focus": 1}}]), 422, "candidates.0.features.category_focus"),
    ("unknown profile feature", body(profile_features={"iq": 140}), 422, "profile_features.iq"),
    ("profile feature not a number", body(profile_features={"preferred_hour": "nine"}), 422,
     "profile_features.preferred_hour"),
    ("candidate feature too large", body(candidates=[{"tip_id": "a", "features": {"len": 1e160}}]), 422,
     "candidates.0.features.len"),
    ("candidate feature NaN", b'{"user_id": "u-1", "candidates": [{"tip_id": "a", "features": {"len": NaN}}]}', 422,
     "candidates.0.features.len"),
    ("profile feature infinite", (b'{"user_id": "u-1", "candidates": [{"tip_id": "a"}], '
                                  b'"profile_features": {"preferred_hour": Infinity}}'), 422,
     "profile_features.preferred_hour"),
    ("profile feature too large", body(profile_features={"preferred_hour": -1e160}), 422,
     "profile_features.preferred_hour"),
    # PostgreSQL cannot store a NUL: one logged, every later checkpoint failed.
    ("NUL in the user id", b'{"user_id": "u\\u0000", "candidates": [{"tip_id": "a"}]}', 422, "user_id"),
    ("NUL in a tip id", b'{"user_id": "u-1", "candidates": [{"tip_id": "b"}, {"tip_id": "\\u0000"}]}', 422,
     "candidates.1.tip_id"),
    ("NUL in a category", body(candidates=[{"tip_id": "a", "category": "x\0"}]), 422, "candidates.0.category"),
    ("NUL in a text feature", body(candidates=[{"tip_id": "a", "features": {"mood": "\0"}}]), 422,
     "candidates.0.features.mood"),
    ("a raw NUL byte", b'{"user_id": "u\0", "candidates": [{"tip_id": "a"}]}', 422, "body"),
    ("not JSON", b'{"user_id": "u-1", ', 422, "body"),
    ("not an object", [1, 2], 422, "body"),
    ("huge body", HUGE, 413, "body"),
]


async def in_chunks(data: bytes, size: int) -> Any:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_a_refusal_for_rows_waiting_asks_for_the_checkpoint_that_writes_them(start_service, nc) -> None:
    """TIPSTREAM_MAX_UNWRITTEN_DECISIONS under the decisions served in one TIPSTREAM_CHECKPOINT_EVERY_S: /score
    answered 503 for the rest of it (here, for good) while the database answered."""
    running = await start_service(max_unwritten_decisions=2, checkpoint_every_s=3600)
    # Its own decisions are not read back then: no hold of the DECISIONS ingest asks for the checkpoint either.
    await eventually(lambda: running.service.decision_tail.following)
    async with running.http() as http:
        assert [(await http.post("/score", json=body())).status_code for _ in range(2)] == [200, 200]
        await eventually(lambda: running.service.decision_log.backlog >= 2)  # their rows, once JetStream has them
        refused = await http.post("/score", json=body())
        assert refused.status_code == 503, refused.text
        # The database answers: the cause is no checkpoint yet, not "is the database away?"
        assert "(no checkpoint has saved them yet)" in refused.json()["error"], refused.text

        async def served() -> bool:
            return (await http.post("/score", json=body())).status_code == 200

        await eventually(served, interval=0.1)


async def test_bad_requests_get_4xx_naming_the_field_and_log_nothing(start_service, nc) -> None:
    running = await start_service(score_max_body_bytes=65_536)
    async with running.http() as http:
        for name, payload, status, field in BAD:
            content = payload if isinstance(payload, bytes) else orjson.dumps(payload)
            response = await http.post("/score", content=content, headers={"content-type": "application/json"})
            assert response.status_code == status, (name, response.text)
            answer = response.json()
            assert answer["field"] == field, (name, answer)
            assert field in answer["error"], (name, answer)
        # Chunked uploads carry no Content-Length: the limit holds on what is read, and a body that
        # arrives in many pieces is put back together.
        json_type = {"content-type": "application/json"}
        too_big = await http.post("/score", content=in_chunks(orjson.dumps(HUGE), 8_192), headers=json_type)
        assert too_big.status_code == 413 and too_big.json()["field"] == "body"
        # Read as JSON whatever its type, a form or text POST from any web page a browser showed
        # logged a decision, with no CORS preflight to stop it.
        for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            typed = await http.post("/score", content=orjson.dumps(body()), headers={"content-type": media or ""})
            assert typed.status_code == 415 and typed.json()["field"] == "Content-Type", (media, typed.text)
            assert "application/json" in typed.json()["error"] and (media or "none").split(";")[0] in typed.text
        # The request is the body: `?explore=false` was answered as if not given, exploring.
        for query, field in (("explore=false", "explore"), ("user_id=u-2&x=1", "user_id"), ("&", "query")):
            queried = await http.post(f"/score?{query}", json=body())
            assert queried.status_code == 422 and queried.json()["field"] == field, (query, queried.text)
            assert "takes no query string: its request is the JSON body" in queried.json()["error"], queried.text
        wrong_method = await http.get("/score")
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
        assert wrong_method.json() == {"error": "GET /score: Method Not Allowed; this path takes POST", "field": None}
        nowhere = await http.post("/scores", json=body())
        # A bare "Not Found" left a first look (the address `tipstream run` prints, opened in a browser) with nothing
        # to go on, and /generate, in the product design, as if it were a mistyped path.
        assert nowhere.status_code == 404
        assert nowhere.json()["error"] == "POST /scores: Not Found; the API's operations are listed by GET /openapi.json"
        root = await http.get("/")
        assert root.json()["error"] == "GET /: Not Found; the API's operations are listed by GET /openapi.json"
        generate = await http.post("/generate", json={"user_id": "u-1"})
        assert generate.status_code == 404 and generate.json()["error"] == (
            "POST /generate: Not Found; tip text is not built yet (docs/operations.md, \"Not built yet\")")
        # A trailing slash was a 307 with no body, to wherever the Host header pointed.
        slashed = await http.post("/score/", json=body())
        assert slashed.status_code == 404 and "location" not in slashed.headers
        assert slashed.json()["error"] == "POST /score/: Not Found; the path is /score, without the trailing slash"
        features = await http.get("/users/u-1/features/")
        assert features.json()["error"].endswith("the path is /users/u-1/features, without the trailing slash")
        # Good ones after them, so the log is known to work: JSON however its type says so.
        ok = [await http.post("/score", content=in_chunks(orjson.dumps(body()), 16), headers={"content-type": media})
              for media in ("application/json", "Application/JSON; charset=utf-8", "application/vnd.app+json")]
        assert [answer.status_code for answer in ok] == [200] * 3, [answer.text for answer in ok]
    service = running.service
    await eventually(lambda: service.publisher.published == 3)
    assert [d for d in service.learner.joins.cache] == [answer.json()["decision_id"] for answer in ok]
    assert await decisions_in_stream(nc.jetstream()) == 3


async def test_a_request_naming_another_host_is_refused_against_dns_rebinding(start_service, nc) -> None:
    """A web page whose domain its owner pointed at 127.0.0.1 once loaded is, to the browser, the service's
    own origin: it could read any user's features and /metrics, and post to /score. Its requests name
    that domain in Host, which a service on loopback never answers to."""
    running = await start_service(allowed_hosts="tips.example")
    port = running.base_url.rsplit(":", 1)[1]
    async with running.http() as http:
        # "[::1]rebound.example" read as "[::1]", whatever followed the bracket.
        for host in ("rebound.example", f"rebound.example:{port}", "127.0.0.1.nip.io", f"localhost.evil:{port}",
                     "[::1]rebound.example", f"[::1].rebound.example:{port}"):
            for method, path, sent in (("GET", "/users/u-1/features", None), ("GET", "/metrics", None),
                                       ("POST", "/score", body())):
                answer = await http.request(method, path, json=sent, headers={"host": host})
                assert answer.status_code == 400 and answer.json()["field"] == "Host", (host, path, answer.text)
                assert f"Host {host!r} is not a name" in answer.json()["error"], answer.text
                assert "add it to TIPSTREAM_ALLOWED_HOSTS" in answer.json()["error"], answer.text
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "tips.example", "TIPS.example."):
            answer = await http.post("/score", json=body(), headers={"host": host})
            assert answer.status_code == 200, (host, answer.text)
    assert len(running.service.learner.joins.cache) == 5, "a refused request logged a decision"


async def test_a_request_with_two_host_headers_or_an_http11_one_with_none_is_refused(start_service, nc) -> None:
    """Two Host headers passed on the first (`Host: 127.0.0.1` then `Host: rebound.example`): a proxy in
    front routing by the other, or reading it as the request's name, saw a request the check never judged.
    HTTP/1.1 without Host was served too; RFC 9112 asks a server to refuse both."""
    running = await start_service()
    parts = urlsplit(running.base_url)
    sent = orjson.dumps(body())

    async def raw(version: bytes, hosts: list[bytes]) -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        head = b"".join(b"Host: %s\r\n" % host for host in hosts)
        writer.write(b"POST /score HTTP/%s\r\n%sConnection: close\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (version, head, len(sent), sent))
        answer = await reader.read()
        writer.close()
        status, _, rest = answer.partition(b"\r\n\r\n")
        return status.split(b"\r\n", 1)[0], rest

    for hosts in ([b"127.0.0.1", b"rebound.example"], [b"127.0.0.1", b"127.0.0.1"], [b"localhost"] * 3):
        status, answer = await raw(b"1.1", hosts)
        assert status.startswith(b"HTTP/1.1 400 "), (hosts, status, answer)
        refusal = orjson.loads(answer)
        assert refusal["field"] == "Host" and f"sent {len(hosts)} times" in refusal["error"], refusal
        assert "send one Host header" in refusal["error"], refusal
    status, answer = await raw(b"1.1", [])
    assert status.startswith(b"HTTP/1.1 400 ") and "must name the host" in orjson.loads(answer)["error"], answer
    assert len(running.service.learner.joins.cache) == 0, "a refused request logged a decision"
    # One Host, and HTTP/1.0 without one (no browser sends that), are served.
    served = [await raw(b"1.1", [b"127.0.0.1"]), await raw(b"1.0", [])]
    assert [status.split(b" ")[1] for status, _ in served] == [b"200", b"200"], served
    assert list(running.service.learner.joins.cache) == [orjson.loads(answer)["decision_id"] for _, answer in served]


async def test_a_body_not_in_utf8_is_refused_as_such_not_as_bad_json(start_service, nc) -> None:
    """A body saved with a byte order mark, or in UTF-16 or Latin-1, shows as valid JSON in its sender's
    editor; the 422 said 'not valid JSON: expected value at line 1 column 1' (or 'invalid unicode code
    point'), which sent them looking for a JSON mistake."""
    token = "utf8-token-for-tests-0123"
    running = await start_service(admin_token=token)
    text = orjson.dumps(body()).decode()
    encoded = {"byte order mark": (b"\xef\xbb\xbf" + text.encode(), "byte order mark (bytes EF BB BF)"),
               "UTF-16": (text.encode("utf-16"), "UTF-16"),
               "UTF-16 without a BOM": (text.encode("utf-16-le"), "UTF-16"),
               "Latin-1": (orjson.dumps(body(user_id="u-é")).decode().encode("latin-1"), "0xE9"),
               # Sent with Content-Encoding: gzip (which the service does not decode): "is not UTF-8 (byte 1 is
               # 0x8B; Latin-1 or Windows-1252?)" sent its sender looking at a text encoding.
               "gzip": (gzip.compress(text.encode()), "compressed with gzip")}
    async with running.http() as http:
        for name, (content, named) in encoded.items():
            answer = await http.post("/score", content=content, headers={"content-type": "application/json"})
            assert answer.status_code == 422 and answer.json()["field"] == "body", (name, answer.text)
            assert named in answer.json()["error"] and "not valid JSON" not in answer.json()["error"], (name, answer.text)
            admin = await http.post("/admin/models/v1/evaluate", content=content,
                                    headers={"content-type": "application/json", "authorization": f"Bearer {token}"})
            assert admin.status_code == 422 and named in admin.json()["error"], (name, admin.text)
        served = await http.post("/score", json=body())
    assert served.status_code == 200
    assert list(running.service.learner.joins.cache) == [served.json()["decision_id"]], "only the good request was logged"


async def test_server_features_win_and_caller_features_fill_what_it_lacks(start_service, nc) -> None:
    running = await start_service()
    js = nc.jetstream()
    # u-1 completed a task at 14:00 local: the server knows preferred_hour, not task durations.
    done = {"id": "e-1", "type": "task.completed", "user_id": "u-1", "ts": "2026-11-26T14:00:00+01:00",
            "data": {"task_id": "t-1"}}
    await js.publish("signals.task.completed", orjson.dumps(done), headers={"Nats-Msg-Id": "e-1"})
    await eventually(lambda: running.service.store.positions.get("SIGNALS") == 1)
    caller = {"preferred_hour": 6, "mean_hours_to_complete_28d": 3.5}
    async with running.http() as http:
        answer = (await http.post("/score", json=body(profile_features=caller,
                                                      context={"now": "2026-11-26T15:00:00+01:00"}))).json()
        unknown = (await http.post("/score", json=body(user_id="u-new", profile_features=caller))).json()
    assert answer["features"]["preferred_hour"] == 14, "the server's value wins"
    assert answer["features"]["mean_hours_to_complete_28d"] == 3.5, "the caller fills what the server lacks"
    assert answer["caller_features"] == ["mean_hours_to_complete_28d"]
    assert unknown["features"]["preferred_hour"] == 6 and sorted(unknown["caller_features"]) == sorted(caller)


async def test_the_shadow_scores_every_request_and_never_reaches_a_user(start_service, nc) -> None:
    running = await start_service(bootstrap_shadow_kind="logreg")
    lineup = running.service.lineup
    assert (lineup.champion_version, lineup.shadow_version) == ("v1", "v2")
    # Warm the user and the tips (so the models, not the popularity prior, decide), then teach
    # the two models opposite tastes.
    js = nc.jetstream()
    for i in range(5):
        seen = {"id": f"r-{i}", "type": "tip.reacted", "user_id": "u-1", "ts": NOW,
                "data": {"tip_id": "tip-9", "reaction": "liked"}}
        await js.publish("feedback.tip.reacted", orjson.dumps(seen), headers={"Nats-Msg-Id": seen["id"]})
    await eventually(lambda: running.service.store.positions.get("FEEDBACK") == 5)
    for _ in range(50):
        lineup.prior.update("tip-0", 0.5)
        lineup.prior.update("tip-1", 0.5)
    x = {"user_id": "u-1", "hour_of_day": 9}
    for _ in range(300):
        lineup.models["v1"].learn_one({**x, "tip_id": "tip-0", "category": "focus"}, 1.0)
        lineup.models["v1"].learn_one({**x, "tip_id": "tip-1", "category": "breaks"}, 0.0)
        lineup.models["v2"].learn_one({**x, "tip_id": "tip-0", "category": "focus"}, 0.0)
        lineup.models["v2"].learn_one({**x, "tip_id": "tip-1", "category": "breaks"}, 1.0)
    request = body(candidates=candidates(2), explore=False)
    async with running.http() as http:
        answers = [(await http.post("/score", json=request)).json() for _ in range(5)]
        lineup.models["v2"].learn_one = None  # a broken shadow must not break answers either
        broken = await http.post("/score", json=request)
    assert broken.status_code == 200
    for answer in answers:
        assert answer["model_version"] == "v1"
        assert [r["tip_id"] for r in answer["ranked"]] == ["tip-0", "tip-1"]
    logged = orjson.loads(running.service.learner.joins.cache[answers[0]["decision_id"]].data)
    assert logged["shadow"] == {"version": "v2", "first": "tip-1"}
    by_tip = {r["tip_id"]: r for r in logged["ranked"]}
    assert by_tip["tip-1"]["shadow_score"] > by_tip["tip-0"]["shadow_score"]
    assert by_tip["tip-0"]["model_score"] > by_tip["tip-1"]["model_score"]


async def test_decisions_wait_for_nats_and_are_published_once_it_is_back(start_service, nats_server, nc) -> None:
    running = await start_service()
    service = running.service
    async with running.http() as http:
        assert (await http.post("/score", json=body())).status_code == 200
        await eventually(lambda: service.publisher.published == 1)
        nats_server.stop()
        await eventually(lambda: not service.nc.is_connected)
        answers = [await http.post("/score", json=body()) for _ in range(5)]
        assert all(a.status_code == 200 for a in answers), "served while NATS is away: the log waits, not the user"
        assert service.publisher.published == 1
        nats_server.start()
        await eventually(lambda: service.publisher.published == 6, timeout=30)
    client = await nats.connect(nats_server.url)
    try:
        info = await client.jetstream().stream_info("DECISIONS")
        assert info.state.messages == 6, "every decision once: retries were de-duplicated by Nats-Msg-Id"
    finally:
        await client.close()


async def test_own_decisions_are_not_read_back_but_others_are(start_service, nc) -> None:
    running = await start_service()
    service, js = running.service, nc.jetstream()
    await eventually(lambda: service.decision_tail.following)
    read_back: list[str] = []
    [decisions] = [ingest for ingest in service.ingests if ingest.spec.name == "DECISIONS"]
    sink = decisions.sink
    decisions.sink = lambda logged, reply=None: read_back.append(logged.id) or sink(logged, reply)
    applied = METRICS.ingested.labels("DECISIONS")._value.get()
    async with running.http() as http:
        answers = [(await http.post("/score", json=body(user_id=f"u-{i}"))).json() for i in range(30)]
    assert all("decision_id" in a for a in answers)
    await eventually(lambda: service.publisher.published == 30)  # answers do not wait for the log
    last = (await js.stream_info("DECISIONS")).state.last_seq
    # The position follows JetStream's acknowledgements of our own publishes, none read back.
    await eventually(lambda: service.store.positions["DECISIONS"] == last)
    assert read_back == [] and service.decision_tail.following
    async with running.http() as http:
        metrics = (await http.get("/metrics")).text
    gauge = [line for line in metrics.splitlines() if line.startswith('tipstream_stream_position{stream="DECISIONS"}')]
    assert gauge == [f'tipstream_stream_position{{stream="DECISIONS"}} {float(last)}'], (gauge, last)
    # Not read back, our own are not counted as applied: an operator watching that counter read 0 under load. Its
    # help says where they show instead.
    assert METRICS.ingested.labels("DECISIONS")._value.get() == applied
    [told] = [line for line in metrics.splitlines() if line.startswith("# HELP tipstream_events_applied_total ")]
    assert 'tipstream_decisions_total{outcome="published"}' in told and "tipstream_stream_position" in told, told

    # A decision someone else publishes is read within a tick or two, and joins feedback.
    foreign = {"id": "d-other-1", "type": "decision.scored", "v": 1, "ts": NOW, "user_id": "u-1",
               "model_version": "v1", "features": {"user_id": "u-1", "hour_of_day": 9},
               "ranked": [{"tip_id": "tip-0", "score": 0.5, "propensity": 1.0}]}
    await js.publish("decisions.score", orjson.dumps(foreign), headers={"Nats-Msg-Id": foreign["id"]})
    await eventually(lambda: "d-other-1" in read_back)
    assert service.decision_tail.resumed >= 1
    await eventually(lambda: service.decision_tail.following, timeout=10)
    assert service.store.positions["DECISIONS"] >= last + 1
    assert set(read_back) == {"d-other-1"}, "reading again started after our own decisions"
    # Counted as the learner took it: the ingest's count is the fold's, which decisions skip (it read 0).
    assert METRICS.ingested.labels("DECISIONS")._value.get() == applied + 1


async def test_decisions_not_yet_in_jetstream_at_shutdown_are_published_at_the_next_start(
        start_service, nats_server, tmp_path, monkeypatch) -> None:
    from app import bootstrap
    from app.decision_spool import SPOOL_NAME

    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.1)  # NATS is away: a stop waits out any bound
    first = await start_service()
    async with first.http() as http:
        assert (await http.post("/score", json=body())).status_code == 200
        await eventually(lambda: first.service.publisher.published == 1)
        nats_server.stop()
        await eventually(lambda: not first.service.nc.is_connected)
        answers = [(await http.post("/score", json=body())).json()["decision_id"] for _ in range(3)]
    await first.stop()  # NATS is still away: before, these three were lost here
    spool = tmp_path / "data" / SPOOL_NAME
    assert spool.exists()
    nats_server.start()
    second = await start_service()
    await eventually(lambda: second.service.publisher.published == 3, timeout=30)
    assert not spool.exists() and all(d in second.service.learner.joins.cache for d in answers)
    client = await nats.connect(nats_server.url)
    try:
        info = await client.jetstream().stream_info("DECISIONS")
        assert info.state.messages == 4
    finally:
        await client.close()


async def test_decisions_that_cannot_be_spooled_for_a_full_disk_are_told_and_the_stop_goes_on(
        start_service, nats_server, tmp_path, monkeypatch, caplog) -> None:
    """The spool's ENOSPC ended the stop there (Starlette's 'Application shutdown failed' traceback): no
    last checkpoint, NATS not drained, the database lock kept, and a half-written spool left behind."""
    import logging

    from app import bootstrap
    from app.decision_spool import RESERVE_NAME, SPOOL_NAME

    if not os.access("/dev/full", os.W_OK):
        pytest.skip("/dev/full is not this user's to write here")
    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.1)  # NATS is away: a stop waits out any bound
    held_before = tmp_path / "data" / RESERVE_NAME  # by a start with TIPSTREAM_SPOOL_RESERVE_MB set
    held_before.parent.mkdir(mode=0o700)
    held_before.write_bytes(bytes(4096))
    first = await start_service()  # with none: the disk is given back, and no room held for the spool either
    spool = tmp_path / "data" / SPOOL_NAME
    assert not held_before.exists()
    spool.with_suffix(".tmp").symlink_to("/dev/full")  # where the spool is written first: the kernel's ENOSPC
    async with first.http() as http:
        nats_server.stop()
        await eventually(lambda: not first.service.nc.is_connected)
        assert (await http.post("/score", json=body())).status_code == 200
    caplog.set_level(logging.INFO, logger="tipstream")
    await first.stop()
    told = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == "tipstream"]
    assert any(m.startswith(f"1 decision served is not acknowledged by JetStream yet: is NATS reachable? They could "
                            f"not be kept in {spool} (No space left on device): they are lost.") for m in told), told
    assert not spool.exists() and not spool.with_suffix(".tmp").exists(), "a half-written spool left behind"
    assert first.service.nc.is_closed, "the stop ended at the spool"


@pytest.mark.parametrize("room_for", [3, 2])
async def test_decisions_waiting_at_a_stop_on_a_full_disk_are_kept_in_the_space_held_for_them(
        room_for: int, start_service, nats_server, tmp_path, monkeypatch, caplog) -> None:
    """The NATS store's disk full: JetStream acknowledged nothing, and at the stop the spool, on the same disk,
    could not be written either (27 decisions lost at a stop on a full 40 MB tmpfs). The space held at the
    start is given up for them; what it does not hold is told as lost."""
    import logging

    import orjson

    from app import bootstrap
    from app.decision_spool import RESERVE_BYTES, RESERVE_NAME, SPOOL_NAME, read

    if not os.access("/dev/full", os.W_OK):
        pytest.skip("/dev/full is not this user's to write here")
    monkeypatch.setattr(bootstrap, "STOP_FLUSH_S", 0.1)  # NATS is away: a stop waits out any bound
    first = await start_service(spool_reserve_mb=RESERVE_BYTES / (1 << 20))
    data = tmp_path / "data"
    reserve = data / RESERVE_NAME
    assert reserve.stat().st_size == RESERVE_BYTES and reserve.stat().st_blocks * 512 >= RESERVE_BYTES
    spool = data / SPOOL_NAME
    async with first.http() as http:
        nats_server.stop()
        await eventually(lambda: not first.service.nc.is_connected)
        for _ in range(3):
            assert (await http.post("/score", json=body())).status_code == 200
    waiting = first.service.publisher.unpublished()
    # The reserve cut to hold the oldest `room_for` (save keeps three quarters of it for the lines' overhead).
    line = max(len(orjson.dumps({"subject": s, "id": d, "event": p.decode()})) for s, d, p in waiting) + 80
    reserve.write_bytes(bytes(line * room_for * 4 // 3 + 4))
    spool.with_suffix(".tmp").symlink_to("/dev/full")  # the kernel's ENOSPC, until the file is made anew
    caplog.set_level(logging.INFO, logger="tipstream")
    await first.stop()
    assert [decision_id for _, decision_id, _ in read(spool)] == [d for _, d, _ in waiting][:room_for]
    assert not reserve.exists()
    told = [r.getMessage() for r in caplog.records if r.name == "tipstream" and "not acknowledged" in r.getMessage()]
    if room_for == 3:
        assert told and told[-1].startswith("3 decisions served are not acknowledged by JetStream yet: is NATS "
                                            f"reachable? Kept in {spool}"), told
    else:
        assert told and told[-1].startswith("3 decisions served are not acknowledged by JetStream yet: is NATS "
                                            f"reachable? The disk is full: the oldest 2 are kept in {spool}"), told


async def test_a_restart_does_not_dead_letter_a_bad_decision_again(start_service, nc) -> None:
    """DECISIONS is re-read from its oldest decision still joinable to rebuild the learner's cache;
    a bad message in that range was dead-lettered before, and must not be again at every start."""
    running = await start_service(checkpoint_every_s=0.1)
    service, js = running.service, nc.jetstream()
    async with running.http() as http:
        assert (await http.post("/score", json=body())).status_code == 200  # the cache reaches back to here
    await eventually(lambda: service.publisher.published == 1)
    before = dead_lettered("DECISIONS")
    bad = await js.publish("decisions.score", b"not a decision", headers={"Nats-Msg-Id": "bad-1"})
    await eventually(lambda: dead_lettered("DECISIONS") == before + 1)
    await eventually(lambda: (service.checkpointer._saved_positions or {}).get("DECISIONS", 0) >= bad.seq)
    await running.stop()
    again = await start_service()
    await eventually(lambda: again.service.decision_tail is not None and again.service.decision_tail.following)
    assert again.service.store.positions["DECISIONS"] >= bad.seq, "re-read past it"
    assert dead_lettered("DECISIONS") == before + 1


async def test_a_seeded_policy_draws_new_numbers_after_a_restart(start_service, nc) -> None:
    """`TIPSTREAM_POLICY_SEED` alone seeded every start alike: the answers after a restart explored
    as the last start's first answers had."""
    seeded = {"policy_seed": 7, "policy_epsilon": 1.0}  # every answer explores: its order is all draws

    async def orders(running: Any) -> list[list[str]]:
        async with running.http() as http:
            answers = [(await http.post("/score", json=body(candidates=candidates(10)))).json() for _ in range(6)]
        await eventually(lambda: running.service.publisher.published == len(answers))
        return [[ranked["tip_id"] for ranked in answer["ranked"]] for answer in answers]

    first = await start_service(**seeded)
    before = await orders(first)
    await first.stop()
    after = await orders(await start_service(**seeded))
    assert after != before, "the restart drew the numbers of the start before"


async def test_a_refused_body_still_being_sent_gets_its_answer_not_a_reset(start_service, nc) -> None:
    """A refusal sent with the rest of the body unread closed a connection holding unread bytes, which
    the kernel resets: a client still sending 300 kB to a 64 kB bound read "Connection reset by peer",
    not the 413 (the API fuzz, once in a fresh-clone run)."""
    running = await start_service(score_max_body_bytes=65_536)
    parts = urlsplit(running.base_url)
    big = b"[" * 300_000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in
                       (big[i:i + 16_384] for i in range(0, len(big), 16_384))) + b"0\r\n\r\n"
    framings = {  # refused by its headers, by what is read, and by its media type
        413: b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big),
        "413 chunked": b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
        415: b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (60_000, big[:60_000]),
    }
    for _ in range(5):
        for status, rest in framings.items():
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            writer.write(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n" + rest)
            await writer.drain()
            answer = await reader.read()
            writer.close()
            assert answer.startswith(b"HTTP/1.1 %s " % str(status).split()[0].encode()), (status, answer[:200])
