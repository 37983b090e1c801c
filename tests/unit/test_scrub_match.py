"""Which user a body belongs to (streams/scrub.py): the prefilter never turns away a body a parser
would give to the user, however a publisher spells the id, and never gives it one that names another."""

from __future__ import annotations

import json

import orjson
from hypothesis import given
from hypothesis import strategies as st

from streams.scrub import belongs, may_belong, owners, spellings

IDS = st.text(min_size=1, max_size=12)


def escaped_every_character(text: str) -> str:
    """A JSON string spelling each character as \\uXXXX (surrogate pairs beyond the BMP): legal, and the
    spelling furthest from orjson's."""
    utf16 = text.encode("utf-16-be")
    return '"' + "".join(f"\\u{utf16[i]:02x}{utf16[i + 1]:02x}" for i in range(0, len(utf16), 2)) + '"'


def spelt_ways(user_id: str, other: str) -> list[bytes]:
    event = {"id": "e-1", "type": "app.opened", "user_id": user_id, "data": {"note": other}}
    return [
        orjson.dumps(event),
        json.dumps(event).encode(),  # ensure_ascii: \u escapes for all non-ASCII
        json.dumps(event, ensure_ascii=False, indent=2).encode(),
        b'{"id": "e-1", "user\\u005fid" : ' + escaped_every_character(user_id).encode() + b"}",
        b'{"user_id": ' + orjson.dumps(other) + b', "user_id": ' + orjson.dumps(user_id) + b"}",  # the last counts
    ]


@given(IDS, IDS)
def test_every_spelling_of_the_users_event_is_theirs_and_no_one_elses(user_id: str, other: str) -> None:
    forget, spelt = frozenset({user_id}), spellings({user_id})
    for body in spelt_ways(user_id, other):
        assert orjson.loads(body)["user_id"] == user_id
        assert may_belong(body, spelt) and belongs(body, forget, spelt), body
        if other != user_id:
            assert not belongs(body, frozenset({other}), spellings({other})), body


@given(IDS, IDS)
def test_a_body_of_another_user_that_names_this_one_is_not_theirs(user_id: str, other: str) -> None:
    body = orjson.dumps({"user_id": other, "data": {"labels": [user_id, f'"user_id": "{user_id}"'],
                                                    "user_id": user_id}})
    assert belongs(body, frozenset({user_id}), spellings({user_id})) == (user_id == other)


@given(IDS, st.integers(min_value=1, max_value=200))
def test_a_body_cut_short_is_theirs_only_when_its_id_is_whole(user_id: str, cut: int) -> None:
    body = orjson.dumps({"id": "e-1", "user_id": user_id, "ts": "2026-11-26T08:00:00+01:00", "v": 1})[:cut]
    whole, key = orjson.dumps(user_id), b'"user_id":'
    # After the key and its colon: a user id ':' is '":"', which the key's own end spells too.
    assert (user_id in owners(body)) == (key in body and whole in body[body.find(key) + len(key):]), body


@given(IDS, st.sampled_from([b'"\\ud83d"', b"1e999", b"-1e400", b'["\\udc00", 1e309]']))
def test_an_event_the_ingest_folds_belongs_to_its_user_when_orjson_cannot_read_it(user_id: str, extra: bytes) -> None:
    # A field the contract does not name with half a surrogate pair (a text cut inside an emoji) or a number past
    # a float: the ingest's parser takes the event, orjson refuses it, and with its key spelt with an escape the
    # event was attributed to no one: kept in the stream, it brought the forgotten user back in the next rebuild.
    from streams.events import parse_event

    body = (b'{"id": "e-1", "type": "app.opened", "user\\u005fid": ' + escaped_every_character(user_id).encode()
            + b', "ts": "2026-11-26T08:00:00+01:00", "data": {}, "note": ' + extra + b"}")
    event = parse_event(body)
    if getattr(event, "user_id", None) != user_id:  # a lone surrogate in the id itself: refused to the DLQ
        return
    assert belongs(body, frozenset({user_id}), spellings({user_id})), body
