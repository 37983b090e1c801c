"""Property-based fuzzing of the HTTP API over real HTTP: near-valid and hostile requests to every route.

One service (the production HTTP protocol, `http_server.bounded_http_protocol`) with a real nats-server and
SQLite, or PostgreSQL where it is reachable, serves the whole module from a thread of its own; hypothesis
sends it requests byte for byte through a raw socket, so that what a client library would refuse to send
(a NUL in a path, a header in Latin-1, an unknown method, duplicate JSON keys) reaches the server too.

The contract checked for every answer: no 5xx and no hang (each request has a deadline); a 4xx from the
application is JSON naming the field or the problem; a refused /score logged no decision; and requests
that should be served still are.

The suite draws the same examples each run (`derandomize`), so that CI judges the code and not the
draw; `TIPSTREAM_TEST_FUZZ_EXPLORE=1` draws new ones, and more of them, to look for what is not yet found.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REQUIRE_POSTGRES, NatsServer, _postgres_reachable, reset_postgres
from tests.integration.served import served_in_a_thread, until

TOKEN = "fuzz-token-0123456789abcdef"
NOW = "2026-11-26T09:00:00+01:00"
# A request not answered within this long is a hang (the slowest legitimate one, a registration,
# trains over the log in a process of its own: a few seconds).
ANSWER_WITHIN_S = 20.0
EXPLORE = bool(os.environ.get("TIPSTREAM_TEST_FUZZ_EXPLORE"))
FUZZ = settings(max_examples=1500 if EXPLORE else 150, derandomize=not EXPLORE, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# How the HTTP parser's refusal of a request the app never sees begins (app/http_server.py).
PARSER_REFUSAL = "not an HTTP/1.1 request this server can read: "


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Fuzzed:
    """The running service, and the decisions /score has handed to its learner (each id, in order)."""

    def __init__(self, host: str, port: int, service: Any) -> None:
        self.host, self.port, self.service = host, port, service
        self.served: list[str] = []
        self.answered_200 = 0
        self.counted_200_before = 0.0  # /metrics' count of /score's 200s when the fuzz began

    def __repr__(self) -> str:  # hypothesis prints it with each failing example
        return f"Fuzzed({self.host}:{self.port})"

    def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
                body: bytes | None = None, framed: bool = False) -> Answer:
        """`framed`: the headers say how the body ends themselves (Content-Length is not added)."""
        head = [method + b" " + target + b" HTTP/1.1", b"Host: " + f"{self.host}:{self.port}".encode(),
                b"Connection: close"]
        head += [name + b": " + value for name, value in headers]
        if body is not None and not framed:
            head.append(b"Content-Length: %d" % len(body))
        with socket.create_connection((self.host, self.port), timeout=ANSWER_WITHIN_S) as sock:
            sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + (body or b""))
            received = bytearray()
            try:
                while chunk := sock.recv(65536):
                    received += chunk
            except TimeoutError:
                pytest.fail(f"no answer within {ANSWER_WITHIN_S} s (a hang): {method!r} {target[:200]!r} "
                            f"{headers!r} {(body or b'')[:300]!r}")
        status_head, _, rest = bytes(received).partition(b"\r\n\r\n")
        while status_head.startswith(b"HTTP/1.1 1"):  # an interim answer (100 Continue): the final one follows
            status_head, _, rest = rest.partition(b"\r\n\r\n")
        assert status_head, f"the connection closed without an answer: {method!r} {target[:200]!r} {headers!r}"
        lines = status_head.split(b"\r\n")
        parsed = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            parsed[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if parsed.get("transfer-encoding") == "chunked":
            rest = _unchunk(rest)
        return Answer(int(lines[0].split()[1]), parsed, rest)

    def score(self, body: bytes, content_type: bytes | None = b"application/json") -> Answer:
        return self.request(b"POST", b"/score", [(b"Content-Type", content_type)] if content_type is not None else [],
                            body)


def counted_200(fuzzed: Fuzzed) -> float:
    """`tipstream_score_requests_total{status="200"}` as GET /metrics says it."""
    metrics = fuzzed.request(b"GET", b"/metrics").body.decode()
    line = next((line for line in metrics.splitlines()
                 if line.startswith('tipstream_score_requests_total{status="200"}')), None)
    return 0.0 if line is None else float(line.rsplit(" ", 1)[1])


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)


def _database(request: pytest.FixtureRequest, tmp: Path) -> str:
    # PostgreSQL is the stricter store (a NUL, text encodings): fuzzed there where it is here, in the
    # session's own database (conftest's `postgres_url`), never the one the URL names.
    if _postgres_reachable() is None or REQUIRE_POSTGRES:  # required (CI): the fixture fails, not SQLite quietly
        url = request.getfixturevalue("postgres_url")
        reset_postgres(url)
        return url
    return f"sqlite:///{tmp / 'tipstream.db'}"


@pytest.fixture(scope="module")
def fuzzed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """The service, started once for the module in a thread with its own event loop."""
    tmp = tmp_path_factory.mktemp("fuzz")
    nats = NatsServer(tmp / "nats")
    nats.start()
    try:  # the nats-server goes with the module whatever fails on the way
        yield from _serve(request, tmp, nats)
    finally:
        nats.stop()


def _serve(request: pytest.FixtureRequest, tmp: Path, nats: NatsServer) -> Iterator[Fuzzed]:
    from app.api import create_app
    from app.settings import Settings

    settings_ = Settings(data_dir=tmp / "data", nats_url=nats.url, admin_token=TOKEN, port=0,
                         database_url=_database(request, tmp), score_max_body_bytes=65_536)
    app = create_app(settings_)
    with served_in_a_thread(app, "fuzzed-service") as served:
        service = app.state.service
        result = Fuzzed(served.host, served.port, service)
        learner_served = service.learner.served

        def counting(decision_id: str, *args: Any, **kwargs: Any) -> None:
            result.served.append(decision_id)
            learner_served(decision_id, *args, **kwargs)

        service.learner.served = counting
        result.counted_200_before = counted_200(result)
        asyncio.run(_publish(nats.url, EVENTS))
        assert until(lambda: service.store.applied >= len(EVENTS)), f"{service.store.applied} events folded"
        yield result


def _event(user: str, i: int, kind: str, ts: str, **data: Any) -> tuple[str, dict[str, Any]]:
    subject = "feedback.tip.reacted" if kind == "tip.reacted" else f"signals.{kind}"
    return subject, {"id": f"{user}-{i}", "type": kind, "user_id": user, "ts": ts, "data": data}


def _history(user: str, times: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Every kind of event, at these times in turn: a user with state in every feature."""
    kinds = [("task.created", {"task_id": "a", "due": times[0]}), ("task.created", {"task_id": "b"}),
             ("task.completed", {"task_id": "b"}), ("tip.shown", {"tip_id": "t-0"}), ("app.opened", {}),
             ("tip.reacted", {"tip_id": "t-0", "reaction": "acted"})]
    return [_event(user, i, kind, times[i % len(times)], **data) for i, (kind, data) in enumerate(kinds)]


# u-1 as the fuzzed bodies' user, and one at the start of the range an event's time may take (a time
# far ahead of the clock is dead-lettered).
EVENTS = (_history("u-1", ["2026-11-20T09:00:00+01:00", "2026-11-24T09:00:00+01:00", "2026-11-25T21:00:00+01:00"])
          + _history("far", ["0001-01-01T23:59:00+23:59", "0001-01-01T00:00:00-23:59", "0001-01-03T00:00:00Z"]))


async def _publish(url: str, events: list[tuple[str, dict[str, Any]]]) -> None:
    import nats as nats_client

    client = await nats_client.connect(url)
    try:
        js = client.jetstream()
        for subject, event in events:
            await js.publish(subject, orjson.dumps(event), headers={"Nats-Msg-Id": event["id"]})
    finally:
        await client.close()


# --- hostile JSON -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text written as is: what orjson will not write (NaN, 1e400, a lone surrogate escape)."""

    text: bytes


@dataclass(frozen=True)
class Pairs:
    """An object written with these (key, value) pairs in order, duplicate keys included."""

    items: tuple[tuple[str, Any], ...]


def dump(value: Any) -> bytes:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Pairs):
        return b"{" + b",".join(dump(k) + b":" + dump(v) for k, v in value.items) + b"}"
    if isinstance(value, dict):
        return dump(Pairs(tuple(value.items())))
    if isinstance(value, list):
        return b"[" + b",".join(dump(v) for v in value) + b"]"
    if isinstance(value, str):
        # A lone surrogate escaped, as JSON.stringify writes it: orjson cannot encode one at all.
        return _escaped(value) if _has_surrogate(value) else orjson.dumps(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        return str(value).encode()
    return orjson.dumps(value)


def _has_surrogate(text: str) -> bool:
    """Whether `text` holds a lone surrogate, the one thing UTF-8 cannot encode (in C: a character at a time in
    Python took seconds of the ingest fuzz, over its megabyte events)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def _escaped(text: str) -> bytes:
    out = []
    for c in text:
        if 0xD800 <= ord(c) <= 0xDFFF:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(orjson.dumps(c).decode()[1:-1])
    return ('"' + "".join(out) + '"').encode()


SPECIAL_TEXT = st.sampled_from([
    "", " ", "\x00", "u\x00", "\u202eevil", "\u200f\u05d0\u05d1", "😀", "😀" * 40, "x" * 129, "x" * 5000,
    "\ud83d", "a\udc00b", "\ufeff", "\ufffd", "%2F", "../..", "\\", '"', "\n", "\r\n", "\t", "null", "NaN",
    "2026-11-26T09:00:00", "2026-11-26T09:00:00Z", "2026-11-26T09:00:00+01", "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+23:59", "2026-02-30T09:00:00+01:00", "1795694400", "1e400", "-0", "true",
])
TEXT = st.one_of(SPECIAL_TEXT, st.text(max_size=40),
                 st.text(st.characters(codec=None, exclude_categories=()), max_size=20))
RAW_NUMBERS = st.sampled_from([Raw(b) for b in (b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"-0",
                                                 b"0.0", b"1E+2", b"18446744073709551616", b"-9223372036854775809",
                                                 b"1" * 400, b"0." + b"0" * 400 + b"1")])
# Integers past a float's range (about 1.8e308) too: JSON has no bound on them, Python's float() has.
BIG_INTEGERS = st.integers(min_value=10**308, max_value=10**330) | st.integers(min_value=-(10**330),
                                                                             max_value=-(10**308))
NUMBERS = st.one_of(st.integers(), st.integers(min_value=-(2**80), max_value=2**80), BIG_INTEGERS,
                    st.floats(allow_nan=False, allow_infinity=False), RAW_NUMBERS)
DEEP = st.integers(1, 3000).map(lambda n: Raw(b"[" * n + b"]" * n))
LEAF = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
HOSTILE = st.one_of(
    LEAF, DEEP,
    st.recursive(LEAF, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                               st.dictionaries(TEXT, inner, max_size=4)), max_leaves=8),
    st.builds(lambda k, a, b: Pairs(((k, a), (k, b))), TEXT, LEAF, LEAF),
)


def valid_score_body() -> st.SearchStrategy[dict[str, Any]]:
    candidate = st.fixed_dictionaries(
        {"tip_id": st.sampled_from(["t-1"])},
        optional={"category": st.sampled_from(["focus", "breaks", None]),
                  "features": st.dictionaries(st.sampled_from(["len", "mood", "x.y", "_a:b-c"]),
                                              st.one_of(st.integers(-100, 100), st.sampled_from(["a", "b"]),
                                                        st.booleans(), st.none()), max_size=2)})

    def distinct(cands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**c, "tip_id": f"t-{i}"} for i, c in enumerate(cands)]

    return st.fixed_dictionaries(
        {"user_id": st.sampled_from(["u-1", "org/42", "ü-2", "😀"]),
         "candidates": st.lists(candidate, min_size=1, max_size=4).map(distinct)},
        optional={"context": st.fixed_dictionaries({}, optional={
                      "now": st.sampled_from([NOW, "2026-11-26T09:00:00Z", "2026-11-26T09:00:00.123-05:30"]),
                      "tasks": st.lists(st.one_of(st.just("write"), st.just({"id": "x"})), max_size=2)}),
                  "profile_features": st.dictionaries(st.sampled_from(["open_tasks", "preferred_hour"]),
                                                      st.integers(0, 5), max_size=2),
                  "explore": st.booleans()})


def paths(value: Any, where: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [where]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*where, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += paths(item, (*where, i))
    return found


def replaced(value: Any, where: tuple[Any, ...], new: Any) -> Any:
    if not where:
        return new
    head, rest = where[0], where[1:]
    if isinstance(value, dict):
        return {**value, head: replaced(value[head], rest, new)}
    copy = list(value)
    copy[head] = replaced(copy[head], rest, new)
    return copy


def removed(value: Any, where: tuple[Any, ...]) -> Any:
    head, rest = where[0], where[1:]
    if rest:
        return replaced(value, (head,), removed(value[head], rest))
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != head}
    return [v for i, v in enumerate(value) if i != head]


@st.composite
def near_valid_score_body(draw: st.DrawFn) -> tuple[Any, bool]:
    """A valid body with 0-3 mutations: a value replaced by a hostile one, a key added or removed.
    Second: whether it is still the valid body."""
    body: Any = draw(valid_score_body())
    mutations = draw(st.integers(0, 3))
    for _ in range(mutations):
        where = draw(st.sampled_from(paths(body)))
        kind = draw(st.sampled_from(["replace", "add", "remove"]))
        if kind == "replace":
            body = replaced(body, where, draw(HOSTILE))
        elif kind == "remove" and where:
            body = removed(body, where)
        elif kind == "add":
            target = body
            for part in where:
                target = target[part]
            if isinstance(target, dict):
                body = replaced(body, where, {**target, draw(TEXT): draw(HOSTILE)})
    return body, mutations == 0


# --- checks ---------------------------------------------------------------------------------------


def assert_refusal_names_the_problem(answer: Answer, what: Any) -> dict[str, Any]:
    assert answer.status < 500, (answer.status, answer.body[:500], what)
    assert 400 <= answer.status < 500, (answer.status, answer.body[:300], what)
    assert answer.headers.get("content-type", "").startswith("application/json"), (answer.headers, answer.body, what)
    refusal = answer.json()
    assert isinstance(refusal.get("error"), str) and refusal["error"].strip(), (refusal, what)
    assert "Traceback" not in refusal["error"], (refusal, what)
    named = refusal.get("field")
    # Named as such, in words ("a user id") or as Python writes it ('\x1f'); the registry's own words for `params`.
    if answer.status == 422 and named and named != "params":
        assert any(form in refusal["error"] for form in (named, named.replace("_", " "), repr(named)[1:-1])), (
            refusal, what)
    return refusal


def parser_refused(answer: Answer) -> bool:
    """Refused by the HTTP parser (400, in JSON, with its reason): the app never saw the request."""
    return answer.status == 400 and assert_refusal_names_the_problem(answer, None)["error"].startswith(PARSER_REFUSAL)


def assert_served_nothing(fuzzed: Fuzzed, before: int, what: Any) -> None:
    assert len(fuzzed.served) == before, (f"a refused request logged {len(fuzzed.served) - before} decision(s)", what)


def field_is_in(body: Any, dotted: str) -> bool:
    """Whether the 422's field names a place in the body sent (or a required one missing there).
    A name's parts are joined by '.', which a key may hold too: every split is tried."""
    if dotted == "body":
        return True

    def walk(value: Any, rest: str) -> bool:
        if rest == "" or value is OPAQUE:  # JSON written raw (deep nesting): what is in it is not checked
            return True
        if isinstance(value, dict):
            for key in value:
                key_text = str(key)
                if rest == key_text or rest.startswith(key_text + ".") and walk(value[key], rest[len(key_text) + 1:]):
                    return True
            return "." not in rest  # a required field missing here
        if isinstance(value, list):
            head, _, tail = rest.partition(".")
            return head.isdigit() and int(head) < len(value) and (not tail or walk(value[int(head)], tail))
        return False

    return walk(body, dotted)


OPAQUE = object()


def lenient(body: Any) -> Any:
    """What the server read the fuzzed body as: Pairs as dicts (the last duplicate wins), Raw as OPAQUE."""
    if isinstance(body, Pairs):
        return {k: lenient(v) for k, v in body.items}
    if isinstance(body, dict):
        return {k: lenient(v) for k, v in body.items()}
    if isinstance(body, list):
        return [lenient(v) for v in body]
    return OPAQUE if isinstance(body, Raw) else body


# --- /score ---------------------------------------------------------------------------------------


@FUZZ
@given(near_valid_score_body())
def test_score_near_valid_bodies(fuzzed: Fuzzed, case: tuple[Any, bool]) -> None:
    body, valid = case
    raw = dump(body)
    before = len(fuzzed.served)
    answer = fuzzed.score(raw)
    if answer.status == 200:
        fuzzed.answered_200 += 1
        assert len(fuzzed.served) == before + 1 and answer.json()["decision_id"] == fuzzed.served[-1]
        return
    assert not valid, (answer.status, answer.body, raw)
    refusal = assert_refusal_names_the_problem(answer, raw[:500])
    assert_served_nothing(fuzzed, before, raw[:500])
    if answer.status == 422:
        assert field_is_in(lenient(body), refusal["field"]), (refusal, raw[:500])


CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from([b"application/json", b"APPLICATION/JSON", b"application/json; charset=utf-8",
                     b"application/json;charset=UTF-8", b"application/json; charset=latin-1",
                     b"application/json; charset=utf-16", b"application/problem+json", b"text/json", b"text/plain",
                     b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x", b"", b" ",
                     b"application/json\t", b"application/json, text/plain", b"*/*", b"application/\xff\xfe",
                     b"application/json; charset=\"utf-8\"", b";", b"+json"]),
    st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b),
)
BODIES = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"", b"null", b"[]", b"{}", b"0", b'"x"', b"{" * 5000, b"[" * 100_000, b"\xef\xbb\xbf{}",
                     b'{"user_id": "u-1", "candidates": [{"tip_id": "a"}]}'.decode().encode("utf-16"),
                     '{"user_id": "é", "candidates": [{"tip_id": "a"}]}'.encode("latin-1"),
                     b'{"user_id": "u-1", "candidates": [{"tip_id": "a"}]} trailing',
                     b'{"user_id": "u-1", "user_id": 7, "candidates": [{"tip_id": "a"}]}',
                     b'{"user_id": "u-1", "candidates": [{"tip_id": "a"}], "candidates": []}',
                     b"user_id=u-1&candidates=a", b"\x00" * 64]),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


@FUZZ
@given(BODIES, CONTENT_TYPES)
def test_score_raw_bodies_and_content_types(fuzzed: Fuzzed, raw: bytes, content_type: bytes | None) -> None:
    before = len(fuzzed.served)
    answer = fuzzed.score(raw, content_type)
    if answer.status == 200:
        fuzzed.answered_200 += 1
        return
    assert_served_nothing(fuzzed, before, (raw[:300], content_type))
    if parser_refused(answer):  # a header value HTTP does not allow (a NUL)
        return
    assert_refusal_names_the_problem(answer, (raw[:300], content_type))
    assert_served_nothing(fuzzed, before, (raw[:300], content_type))


QUERY = st.one_of(
    st.just(b""),
    st.sampled_from([b"?", b"?at=", b"?at=yesterday", b"?at=2026-11-26T09:00:00+01:00",
                     b"?at=2026-11-26T09:00:00%2B01:00", b"?at=1&at=2", b"?as_of=x", b"?at=%00", b"?at=%FF",
                     b"?&&&", b"?=", b"?at", b"?at=" + b"9" * 5000, b"?at=0001-01-01T00:00:00%2B23:59"]),
    st.text(max_size=30).map(lambda t: b"?" + quote(t, safe="=&").encode()),
)
ENCODINGS = st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252", "utf-8-sig"])


@FUZZ
@given(valid_score_body(), ENCODINGS)
def test_score_bodies_not_in_utf8(fuzzed: Fuzzed, body: dict[str, Any], encoding: str) -> None:
    # A non-ASCII character, so that Latin-1 differs from UTF-8.
    text = orjson.dumps({**body, "user_id": "ü-" + body["user_id"]}).decode()
    raw = text.encode(encoding, "replace")
    before = len(fuzzed.served)
    answer = fuzzed.score(raw, b"application/json; charset=" + encoding.encode())
    refusal = assert_refusal_names_the_problem(answer, (encoding, raw[:200]))
    assert_served_nothing(fuzzed, before, (encoding, raw[:200]))
    assert answer.status == 422 and refusal["field"] == "body", refusal
    assert "UTF-8" in refusal["error"] and "not valid JSON" not in refusal["error"], (encoding, refusal)


@FUZZ
@given(valid_score_body(), QUERY.filter(lambda q: len(q) > 1))
def test_score_with_a_query_string(fuzzed: Fuzzed, body: dict[str, Any], query: bytes) -> None:
    before = len(fuzzed.served)
    answer = fuzzed.request(b"POST", b"/score" + query, [(b"Content-Type", b"application/json")], orjson.dumps(body))
    if parser_refused(answer):
        return
    refusal = assert_refusal_names_the_problem(answer, query)
    assert_served_nothing(fuzzed, before, query)
    assert answer.status == 422 and "query string" in refusal["error"], (query, refusal)


def _chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i:i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


HEADER_SETS = st.lists(st.sampled_from([
    (b"Expect", b"100-continue"), (b"Upgrade", b"websocket"), (b"Upgrade", b"h2c"), (b"Connection", b"Upgrade"),
    (b"Content-Type", b"text/plain"), (b"Content-Type", b"application/json"), (b"Content-Encoding", b"gzip"),
    (b"Accept", b"text/html"), (b"Accept-Charset", b"latin-1"), (b"X-Forwarded-For", b"\xff"),
    (b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"identity"), (b"Host", b"elsewhere.example"),
    (b"Origin", b"https://evil.example"), (b"Cookie", b"a=b"), (b"Authorization", b"Bearer x"),
]), max_size=4)


@FUZZ
@given(valid_score_body(), HEADER_SETS, st.sampled_from(["length", "chunked", "chunked-1", "short-length"]))
def test_score_with_odd_headers_and_framing(fuzzed: Fuzzed, body: dict[str, Any], extra: list[tuple[bytes, bytes]],
                                           framing: str) -> None:
    raw = orjson.dumps(body)
    headers = [(b"Content-Type", b"application/json"), *extra]
    before = len(fuzzed.served)
    if framing == "length":
        answer = fuzzed.request(b"POST", b"/score", headers, raw)
    elif framing == "short-length":  # a Content-Length smaller than the body: the rest is a next request
        answer = fuzzed.request(b"POST", b"/score", [*headers, (b"Content-Length", b"%d" % (len(raw) // 2))], raw,
                                framed=True)
    else:
        size = 1 if framing == "chunked-1" else 64
        answer = fuzzed.request(b"POST", b"/score", [*headers, (b"Transfer-Encoding", b"chunked")],
                                _chunked(raw, size), framed=True)
    if answer.status == 200:
        fuzzed.answered_200 += 1
        assert len(fuzzed.served) == before + 1 and answer.json()["decision_id"] == fuzzed.served[-1]
        return
    assert_served_nothing(fuzzed, before, (extra, framing))
    assert_refusal_names_the_problem(answer, (extra, framing))


# --- paths, queries, methods ----------------------------------------------------------------------


# Short ids of the characters that paths and text handling trip on, often mixed.
ODD_ID = st.text(st.sampled_from(["a", "/", ".", "%", "+", "?", "#", " ", "\x00", "\ufffd", "\ufeff", "\u202e", "😀",
                                  "\ud800", "é"]), min_size=1, max_size=6)
ID_TEXT = st.one_of(SPECIAL_TEXT, ODD_ID, st.text(min_size=0, max_size=140),
                    st.sampled_from(["a/b", "a%2Fb", ".", "..", "a/../b", "x" * 128, "x" * 129, "x" * 100_000]))


def _user_id_allowed(text: str) -> bool:
    """What an event's user_id may be (1-128 characters), and a path can carry: no NUL, whole characters."""
    return 1 <= len(text) <= 128 and "\x00" not in text and not _has_surrogate(text)


def _percent_encoded(text: str, safe: str) -> tuple[bytes, str | None]:
    return quote(text.encode("utf-8", "surrogatepass"), safe=safe).encode(), text if _user_id_allowed(text) else None


# A path segment, and the id it must be read as when it is one an event may carry (else None: a 4xx will do).
SEGMENT = st.one_of(
    ID_TEXT.map(lambda t: _percent_encoded(t, "")),
    ID_TEXT.map(lambda t: _percent_encoded(t, "/.")),
    st.sampled_from([b"%00", b"%2F", b"%2f", b"%", b"%zz", b"%FF", b"%C0%AF", b"%ED%A0%80", b"..", b".", b"a%20b",
                     b"a+b", b"%E2%80%AE", b"a;b", b"a?b", b"a#b", b"\xc3\xa9", b"\xff"]).map(lambda b: (b, None)),
)
RAW_SEGMENT = SEGMENT.map(lambda case: case[0])


def _target_ok(target: bytes) -> bool:
    # What HTTP/1.1 lets a request target hold; uvicorn's parser refuses the rest (raw non-ASCII too).
    return len(target) < 60_000 and all(0x21 <= c < 0x7F for c in target)


@FUZZ
@given(SEGMENT, QUERY)
def test_features_of_any_user_id_and_query(fuzzed: Fuzzed, case: tuple[bytes, str | None], query: bytes) -> None:
    segment, user_id = case
    target = b"/users/" + segment + b"/features" + query
    answer = fuzzed.request(b"GET", target)
    if parser_refused(answer):
        assert not _target_ok(target), target[:200]
        return
    if answer.status == 200:
        assert user_id is None or answer.json()["user_id"] == user_id, (answer.json()["user_id"], user_id)
        return
    refusal = assert_refusal_names_the_problem(answer, target[:300])
    # An id an event may carry is always served: a 422 for it is a user whose features cannot be read.
    assert user_id is None or refusal.get("field") != "user_id", (refusal, target[:300])


VERSION_ROUTES = [(b"GET", b"/models/%s"), (b"GET", b"/models/%s/card")]


@FUZZ
@given(RAW_SEGMENT, st.sampled_from(VERSION_ROUTES), QUERY)
def test_model_reads_of_any_version(fuzzed: Fuzzed, segment: bytes, route: tuple[bytes, bytes], query: bytes) -> None:
    method, pattern = route
    target = pattern.replace(b"%s", segment) + query
    answer = fuzzed.request(method, target)
    if parser_refused(answer):
        assert not _target_ok(target), target[:200]
        return
    if answer.status == 200:
        return
    assert_refusal_names_the_problem(answer, target[:300])


ALL_PATHS = [b"/score", b"/healthz", b"/readyz", b"/metrics", b"/users/u-1/features", b"/models", b"/models/v1",
             b"/models/v1/card", b"/admin/models", b"/admin/models/v1/shadow", b"/admin/models/v1/promote",
             b"/admin/models/v1/retire", b"/admin/models/v1/evaluate", b"/admin/rollback",
             b"/admin/users/u-1/forget", b"/openapi.json", b"/", b"/nowhere", b"/score/", b"//score", b"/SCORE"]
METHODS = st.one_of(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE",
                                     b"CONNECT", b"PROPFIND", b"get", b"FOO"]),
                    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=12).map(str.encode))


@FUZZ
@given(METHODS, st.sampled_from(ALL_PATHS))
def test_any_method_on_any_path(fuzzed: Fuzzed, method: bytes, path: bytes) -> None:
    before = len(fuzzed.served)
    answer = fuzzed.request(method, path, [(b"Content-Type", b"application/json")], b"{}")
    assert_served_nothing(fuzzed, before, (method, path))
    if parser_refused(answer):
        return
    if answer.status < 400:
        assert method in (b"GET", b"HEAD") and path not in (b"/score",) and not path.startswith(b"/admin/"), (
            method, path, answer.status)
        return
    refusal = assert_refusal_names_the_problem(answer, (method, path)) if method != b"HEAD" else None
    if answer.status == 405:
        assert "allow" in answer.headers, (method, path, answer.headers)
        if refusal is not None:
            assert method.decode() in refusal["error"] and answer.headers["allow"] in refusal["error"], refusal


def _iso(moment: datetime, offset_min: int, style: str) -> str:
    zone = timezone(timedelta(minutes=offset_min))
    text = moment.replace(tzinfo=zone).isoformat(timespec=style)
    return text.replace("+00:00", "Z") if offset_min == 0 and style == "seconds" else text


# Any wall time with any offset an ISO 8601 time may carry; some fall outside 0001-9999 once in UTC.
TIMES = st.builds(_iso, st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
                  st.integers(-1439, 1439), st.sampled_from(["seconds", "milliseconds", "microseconds"]))


def _in_range(text: str) -> bool:
    try:
        datetime.fromisoformat(text).astimezone(UTC)
    except OverflowError:
        return False
    return True


@FUZZ
@given(st.sampled_from(["u-1", "far", "nobody"]), TIMES)
def test_features_at_any_time(fuzzed: Fuzzed, user: str, at: str) -> None:
    answer = fuzzed.request(b"GET", f"/users/{user}/features?at={quote(at)}".encode())
    if not _in_range(at):
        refusal = assert_refusal_names_the_problem(answer, at)
        assert answer.status == 422 and refusal["field"] == "at", (at, refusal)
        return
    assert answer.status == 200, (at, answer.status, answer.body[:300])
    features = answer.json()["features"]
    for name, value in features.items():  # JSON has no NaN or infinity: a value is a number, text or null
        assert value["value"] is None or isinstance(value["value"], (int, float, str, bool)), (name, value)


@FUZZ
@given(st.sampled_from(["u-1", "far", "nobody"]), TIMES, st.booleans())
def test_score_at_any_time(fuzzed: Fuzzed, user: str, now: str, explore: bool) -> None:
    before = len(fuzzed.served)
    answer = fuzzed.score(orjson.dumps({"user_id": user, "candidates": [{"tip_id": "t-0"}, {"tip_id": "t-1"}],
                                        "context": {"now": now}, "explore": explore}))
    if not _in_range(now):
        refusal = assert_refusal_names_the_problem(answer, now)
        assert answer.status == 422 and refusal["field"] == "context.now", (now, refusal)
        assert_served_nothing(fuzzed, before, now)
        return
    assert answer.status == 200, (now, answer.status, answer.body[:300])
    fuzzed.answered_200 += 1
    assert len(fuzzed.served) == before + 1
    assert all(0.0 <= r["score"] <= 1.0 for r in answer.json()["ranked"]), answer.json()["ranked"]


REQUEST_LINES = st.one_of(
    st.binary(max_size=80),
    st.sampled_from([b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n", b"GET /healthz HTTP/0.9\r\n\r\n",
                     b"GET /healthz HTTP/9.9\r\n\r\n", b"GET /healthz\r\n\r\n",
                     b"\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
                     b"GET http://elsewhere/healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"GET /healthz HTTP/1.1\nHost: x\n\n",
                     b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"]),
)


@FUZZ
@given(REQUEST_LINES)
def test_any_bytes_on_the_wire(fuzzed: Fuzzed, data: bytes) -> None:
    """Whatever a client writes, then ends its side: an answer (a JSON refusal, if it was no request the
    app could read) or the connection closed, never a wait past the deadline, and no decision."""
    before = len(fuzzed.served)
    with socket.create_connection((fuzzed.host, fuzzed.port), timeout=ANSWER_WITHIN_S) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pytest.fail(f"no answer and the connection still open after {ANSWER_WITHIN_S} s: {data!r}")
        except ConnectionResetError:
            pass
    assert_served_nothing(fuzzed, before, data)
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    if head.startswith(b"HTTP/1.1 4"):
        assert b"content-type: application/json" in head.lower(), (data, bytes(received[:300]))
        assert orjson.loads(body)["error"], (data, body)
    else:
        assert not head or head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 100")), (data, bytes(received[:300]))


# --- admin ----------------------------------------------------------------------------------------


AUTHORIZATIONS = st.one_of(
    st.sampled_from([None, b"", b"Bearer", b"Bearer ", b"bearer " + TOKEN.encode(), b"BEARER " + TOKEN.encode(),
                     b"Bearer  " + TOKEN.encode(), b"Bearer\t" + TOKEN.encode(), TOKEN.encode(),
                     b"Basic " + TOKEN.encode(), b"Bearer " + TOKEN.encode() + b"x", b"Bearer " + TOKEN.encode()[:-1],
                     b"Bearer " + TOKEN.encode() + b" extra", b"Bearer \xe9\xe8", b"Bearer " + "ü".encode(),
                     b"Bearer \xff" * 50, b"Token " + TOKEN.encode(), b"Bearer " + b"x" * 20_000]),
    st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b).map(lambda b: b.strip() or None),
    st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b).map(lambda b: b"Bearer " + b),
)
ADMIN_ROUTES = [b"/admin/models/nope/shadow", b"/admin/models/nope/promote", b"/admin/models/nope/retire",
                b"/admin/models/nope/evaluate", b"/admin/models", b"/admin/rollback", b"/admin/users/fuzzed/forget"]


@FUZZ
@given(AUTHORIZATIONS, st.sampled_from(ADMIN_ROUTES), st.sampled_from([b"POST", b"GET"]))
def test_admin_authorization_headers(fuzzed: Fuzzed, authorization: bytes | None, route: bytes,
                                     method: bytes) -> None:
    headers = [(b"Content-Type", b"application/json")]
    if authorization is not None:
        headers.append((b"Authorization", authorization))
    # A body that no route accepts: whether the token is taken, its refusal is a 4xx all the same.
    answer = fuzzed.request(method, route, headers, b'{"actor": ""}')
    if parser_refused(answer):
        return
    refusal = assert_refusal_names_the_problem(answer, (authorization, route))
    # The scheme, a space, the token: the space after and around the token does not count.
    scheme, _, given_token = (authorization or b"").decode("latin-1").partition(" ")
    right = scheme.lower() == "bearer" and given_token.strip() == TOKEN
    if method == b"POST" or route.startswith(b"/admin/users/"):  # a route and method there are
        assert (answer.status not in (401, 403)) == right, (authorization, answer.status, refusal)
    if answer.status == 401:
        assert answer.headers.get("www-authenticate", "").startswith("Bearer"), answer.headers


def _admin_bodies() -> st.SearchStrategy[Any]:
    change = st.fixed_dictionaries({}, optional={"actor": TEXT, "note": TEXT})
    register = st.fixed_dictionaries({"version": st.one_of(st.sampled_from(["v1", "-x", ""]), TEXT)},
                                     optional={"kind": st.one_of(st.sampled_from(["logreg", "svm"]), TEXT),
                                               "params": st.one_of(st.dictionaries(TEXT, HOSTILE, max_size=3),
                                                                   HOSTILE),
                                               "actor": TEXT, "note": TEXT})
    return st.one_of(change, register, HOSTILE)


ADMIN_WRITES = [b"/admin/models/nope/shadow", b"/admin/models/nope/promote", b"/admin/models/nope/retire",
                b"/admin/models/nope/evaluate", b"/admin/models", b"/admin/users/fuzzed/forget"]


@FUZZ
@given(st.sampled_from(ADMIN_WRITES), _admin_bodies())
def test_admin_bodies(fuzzed: Fuzzed, route: bytes, body: Any) -> None:
    raw = dump(body)
    headers = [(b"Content-Type", b"application/json"), (b"Authorization", b"Bearer " + TOKEN.encode())]
    answer = fuzzed.request(b"POST", route, headers, raw)
    if answer.status in (200, 202):
        return
    refusal = assert_refusal_names_the_problem(answer, (route, raw[:500]))
    if answer.status == 422 and refusal["field"] not in ("params", "user_id"):
        assert field_is_in(lenient(body), refusal["field"]), (refusal, raw[:500])


# No null: it is every parameter's default where it is allowed, and each version registered costs a process.
PARAM_VALUES = st.one_of(HOSTILE.filter(lambda v: v is not None), NUMBERS, st.sampled_from([
    0, 1, -1, 0.5, 1e-300, 2**63, 2**64, Raw(b"1" + b"0" * 400), "adagrad", "sgd", "numeric",
    [["category", "hour_of_day"]], [["user_id", "user_id"]], [["x"]], [[]], [["category", 7]], {"a": "b"}]))


@settings(FUZZ, max_examples=40)
@given(st.from_regex(r"fz[A-Za-z0-9._-]{1,12}", fullmatch=True), st.sampled_from(["logreg", "fm"]),
       st.dictionaries(st.sampled_from(["optimizer", "learning_rate", "l2", "intercept_lr", "n_factors", "seed",
                                        "latents", "user_forgetting", "user_ttl_days", "max_values", "hour_bucket",
                                        "interactions"]), PARAM_VALUES, min_size=1, max_size=3))
def test_register_with_any_parameters(fuzzed: Fuzzed, version: str, kind: str, params: dict[str, Any]) -> None:
    """Parameters by their real names with any values: what the registry refuses is a 4xx naming
    `params`; what it takes is trained over the log (a process each: few are let through)."""
    headers = [(b"Content-Type", b"application/json"), (b"Authorization", b"Bearer " + TOKEN.encode())]
    raw = dump({"version": version, "kind": kind, "params": params})
    answer = fuzzed.request(b"POST", b"/admin/models", headers, raw)
    if answer.status == 200:
        assert answer.json()["version"] == version
        card = fuzzed.request(b"GET", f"/models/{version}/card".encode())
        assert card.status == 200, card.body[:300]
        return
    refusal = assert_refusal_names_the_problem(answer, raw[:300])
    assert answer.status in (409, 422), (answer.status, refusal)
    assert answer.status == 409 or refusal["field"] in ("params", "body") or refusal["field"].startswith("params."), (
        refusal, raw[:300])


@FUZZ
@given(SEGMENT, st.sampled_from([b"POST", b"GET"]))
def test_forget_any_user_id(fuzzed: Fuzzed, case: tuple[bytes, str | None], method: bytes) -> None:
    segment, user_id = case
    headers = [(b"Content-Type", b"application/json"), (b"Authorization", b"Bearer " + TOKEN.encode())]
    target = b"/admin/users/" + segment + b"/forget"
    answer = fuzzed.request(method, target, headers, b"{}" if method == b"POST" else None)
    if parser_refused(answer):
        assert not _target_ok(target), target[:200]
        return
    if answer.status in (200, 202):
        assert user_id is None or answer.json()["user_id"] == user_id, (answer.json(), user_id)
        return
    refusal = assert_refusal_names_the_problem(answer, target[:300])
    # An id an event may carry can always be forgotten (and asked after): else that user never can be.
    assert user_id is None or answer.status == 404 and method == b"GET", (answer.status, refusal, user_id)


def test_score_still_serves_after_the_fuzz(fuzzed: Fuzzed) -> None:
    before = len(fuzzed.served)
    answer = fuzzed.score(orjson.dumps({"user_id": "u-1", "candidates": [{"tip_id": "a"}, {"tip_id": "b"}]}))
    assert answer.status == 200, answer.body
    fuzzed.answered_200 += 1
    assert len(fuzzed.served) == before + 1
    # Every decision served, and no other, reached JetStream.
    publisher = fuzzed.service.publisher
    until(lambda: publisher.published >= len(fuzzed.served))
    assert publisher.published == len(fuzzed.served) == fuzzed.answered_200
    assert counted_200(fuzzed) - fuzzed.counted_200_before == fuzzed.answered_200, "/metrics counted other 200s"
