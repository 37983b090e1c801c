"""The decision log: every /score answer as an event on `decisions.>`, and as a `tip_scores` row.

A decision event (wire contract v1, subject `decisions.score`, header `Nats-Msg-Id` = its id)::

    {"id": "d-0193...", "type": "decision.scored", "v": 1, "ts": "2026-11-26T08:00:00.123+01:00",
     "user_id": "u-42", "model_version": "v1", "shadow_version": "v2", "prompt_version": null,
     "policy": "epsilon_greedy", "explore": true, "greedy": "tip-focus-1",  # the champion's own first
     "features_at": "2026-11-26T08:00:00.123+01:00",
     "features": {"user_id": "u-42", "hour_of_day": 8, ...},        # shared by every candidate
     "caller_features": ["preferred_hour"],                          # filled in from the request
     "ranked": [{"tip_id": "tip-focus-1", "category": "focus", "score": 0.71, "propensity": 0.93,
                 "model_score": 0.74, "shadow_score": 0.55}, ...],  # in the order served
     "shadow": {"version": "v2", "first": "tip-breaks-2"}}

The learner joins feedback with the `features` and the candidate's own fields, so a model
learns from the features as they were served.
Publishing them to JetStream is `decision_publisher.py`'s.

Every decision read back is checked for what the learner's join, its `tip_scores` row and a model card use (one
from another publisher may lack it); one that falls short goes to the DLQ saying what to fix.

>>> payload = encode({"id": "d-1", "type": "decision.scored", "ts": "2026-11-26T08:00:00+01:00", "user_id": "u",
...                   "model_version": "v1", "features": {}, "ranked": [{"tip_id": "t", "score": 0.5, "propensity": 1}]})
>>> decoded = decode_decision("decisions.score", payload)
>>> decoded.id, decoded.data == payload, decoded.body["user_id"]
('d-1', True, 'u')
>>> decode_decision("decisions.score", b'{"id": 7}').kind
'invalid_field'
>>> decode_decision("decisions.score", payload.replace(b'"tip_id":"t"', b'"tip":"t"')).reason
"ranked[0]: field 'tip_id' must be a string of 1-128 characters without NUL"
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from app.checkpoint_rows import write_tip_scores
from app.learning_metrics import DECISION_ROWS
from app.score_request import CROSS_FORM, ONE_HOT_PREFIXES, SERVER_INPUTS
from streams.events import Rejection, not_a_version, unsupported_version

SUBJECT_SCORE = "decisions.score"
DECISION_TYPE = "decision.scored"


def encode(decision: dict[str, Any]) -> bytes:
    """The event's bytes; `id` first, so consumers can read it without parsing the rest.

    A copy of exactly its length: the bytes orjson returns keep the capacity of the buffer it
    grew (tracemalloc: 4-16 KB held for a 2 KB decision), and the learner's join cache keeps
    decisions for days, so its memory was ~4 x its budget.
    """
    return bytes(memoryview(orjson.dumps(decision)))


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """A decision read back from the DECISIONS stream: its id, its bytes and, once checked, its body."""

    id: str
    data: bytes
    body: dict[str, Any] | None = None  # None: parsed from `data` when needed

    def parsed(self) -> dict[str, Any]:
        return self.body if self.body is not None else orjson.loads(self.data)


# Text fields and the length of the `tip_scores` column each lands in (`db.tip_scores`): a longer
# value, or one holding a NUL (PostgreSQL stores none), failed every checkpoint after it.
_REQUIRED_TEXT = (("id", 128), ("user_id", 128), ("model_version", 64))
_OPTIONAL_TEXT = (("shadow_version", 64), ("prompt_version", 64), ("policy", 32))
_KIND_MAX = 16


def _text(value: Any, limit: int, required: bool = True) -> bool:
    if value is None:
        return not required
    shortest = 1 if required else 0
    return isinstance(value, str) and shortest <= len(value) <= limit and "\x00" not in value


_NUMBERS = (int, float)  # exact classes: orjson makes no others, and a bool is no number here
# What a model input may be (`TipModel`: a number, a string, a bool, None for missing), as orjson
# parses them. A list or an object passed once, and no model could learn it: its reward was credited
# all the same, and once its row held it, every `register` and `evaluate` failed reading it (a 500).
_SCALARS = frozenset((str, int, float, bool, type(None)))
_NOT_SCALAR = "must be a number, a string, true/false or null"


def _not_scalar(features: dict[str, Any]) -> str | None:
    """The first feature whose value is no model input, or None."""
    for name, value in features.items():
        if value.__class__ not in _SCALARS:
            return name
    return None


def _read_as_own(name: str, value: Any) -> str | None:
    """What the model reads `name` = `value` as, when that is the weight of a user, a tip or a category, or the
    form of a cross ('a*b=x*y'), which may be a user's own (as /score refuses them); else None."""
    read_as = f"{name}_{value}" if value.__class__ is str else name
    if read_as.startswith(ONE_HOT_PREFIXES) or ("=" in read_as and CROSS_FORM.match(read_as)):
        return read_as
    return None


def _another_users(body: dict[str, Any], features: dict[str, Any]) -> str | None:
    """Why the decision's shared features would train weights that are not its user's, or None. /score writes
    the user's id and numbers only; another publisher's decision naming another user there (or a feature the
    model reads as that user's own) had that user's own weights learn from this user's reactions, and stayed in
    DECISIONS when that user was forgotten (the message is this user's), for a rebuild to learn again."""
    user_id = body["user_id"]
    for name, value in features.items():
        if name == "user_id":
            if value != user_id:
                return f"features.'user_id' is {value!r}, not the decision's own user {user_id!r}"
        elif (value.__class__ is str or name.startswith(ONE_HOT_PREFIXES)) and (
                read_as := _read_as_own(name, value)) is not None:
            return f"features.{name!r} = {value!r} is read by the model as {read_as!r}, a weight /score never logs"
    return None


def _candidate_problem(candidate: Any) -> str | None:
    # Class identity rather than isinstance: a restart re-reads every decision of the join window.
    if candidate.__class__ is not dict:
        return "a candidate must be an object"
    tip_id = candidate.get("tip_id")
    if tip_id.__class__ is not str or not 0 < len(tip_id) <= 128 or "\x00" in tip_id:
        return "field 'tip_id' must be a string of 1-128 characters without NUL"
    if candidate.get("score").__class__ not in _NUMBERS or candidate.get("propensity").__class__ not in _NUMBERS:
        return "fields 'score' and 'propensity' must be numbers"
    category, features = candidate.get("category"), candidate.get("features")
    if (category is not None and category.__class__ is not str) or (features is not None and features.__class__ is not dict):
        return "'category' must be a string and 'features' an object, when given"
    if features:
        name = _not_scalar(features)
        if name is not None:
            return f"features.{name!r} {_NOT_SCALAR}"  # repr: a publisher's key (CR/LF) goes into the log
        # As /score refuses a candidate's own features (`score_request.parse_request`): read as a user's own
        # weight, they trained it on whoever reacted to this decision.
        for name, value in features.items():
            if name in SERVER_INPUTS:
                return f"features.{name!r} is an input the server computes; a candidate's own feature may not use it"
            read_as = _read_as_own(name, value)
            if read_as is not None:
                return f"features.{name!r} = {value!r} is read by the model as {read_as!r}, which /score refuses"
    return None


def _aware_time(value: Any) -> bool:
    try:
        moment = datetime.fromisoformat(value) if isinstance(value, str) else None
        if moment is None or moment.tzinfo is None:
            return False
        # Its row's created_at is the instant in UTC: in year 1 or 9999 an offset can take it out of what a
        # datetime holds, and making the row raised then (the decision dead-lettered as a bug of ours while the
        # join cache kept it, and feedback crediting it after it).
        moment.astimezone(UTC)
        return True
    except (ValueError, OverflowError):
        return False


DECISION_VERSION = 1  # the decision contract's version, which /score writes (`app.scoring`); there are no upcasters


def version_problem(body: dict[str, Any]) -> Rejection | None:
    """Why a decision's `v` is not one this server reads, or None: absent (v1, as for an event) or the JSON number 1
    (`1.0` too, as JSON Schema's `integer` takes it).

    >>> version_problem({"v": 2}).reason
    'v=2 is newer than the decisions this server reads (v1): upgrade tipstream to a release that reads v2, or have the publisher send v1; then publish the decision again'
    >>> version_problem({"v": True}).kind, version_problem({"v": 0}).kind, version_problem({"v": 1.0})
    ('invalid_field', 'unsupported_version', None)
    """
    version = body.get("v", DECISION_VERSION)
    if version.__class__ is float and version.is_integer() and abs(version) < 2**53:
        version = int(version)
    if version.__class__ is not int:  # bool is a subclass of int, not its class
        return not_a_version(version, "decision", DECISION_VERSION)
    if version == DECISION_VERSION:
        return None
    return unsupported_version(version, "decision", DECISION_VERSION, upcasters=False)


def decision_problem(body: dict[str, Any]) -> Rejection | None:
    """Why a decision cannot be joined, get its `tip_scores` row or be read by a model card, or None.
    A decision /score wrote always passes; one from another publisher that did not was joined
    anyway, and feedback naming it failed in the learner, holding FEEDBACK at that event for good."""
    # First, as for an event: a newer contract may rename or add what the checks below ask for, and what is wrong
    # then is that this server is older. Unchecked, a publisher's `"v": 2` (or `true`) was joined as v1.
    problem = version_problem(body)
    if problem is not None:
        return problem
    for name, limit in _REQUIRED_TEXT:
        if not _text(body.get(name), limit):
            return Rejection("invalid_field", f"field {name!r} must be a string of 1-{limit} characters without NUL")
    for name, limit in _OPTIONAL_TEXT:
        if not _text(body.get(name), limit, required=False):
            return Rejection("invalid_field", f"field {name!r} must be a string of at most {limit} characters "
                                              "without NUL, or null")
    kind = body.get("type", DECISION_TYPE)
    if not isinstance(kind, str) or not _text(kind.split(".", 1)[-1], _KIND_MAX):
        return Rejection("invalid_field", f"field 'type' must be a string, its part after the first dot 1-{_KIND_MAX} "
                                          "characters without NUL")
    if not _aware_time(body.get("ts")):
        return Rejection("invalid_field", "field 'ts' must be an ISO 8601 time with a UTC offset, in UTC between "
                                          "years 1 and 9999")
    # A card's policy value reads these of every rewarded decision (`evaluation.policy_value`): a list
    # there, or a shadow as text or without its first tip, failed every `evaluate` once rewarded.
    greedy, shadow = body.get("greedy"), body.get("shadow")
    if greedy is not None and greedy.__class__ is not str:
        return Rejection("invalid_field", "field 'greedy' must be a tip id (a string), or null")
    if shadow is not None and (shadow.__class__ is not dict or shadow.get("version").__class__ is not str
                               or shadow.get("first").__class__ is not str):
        return Rejection("invalid_field", "field 'shadow' must be an object with the strings 'version' and 'first', "
                                          "or null")
    ranked = body.get("ranked")
    features = body.get("features")
    if not isinstance(ranked, list) or not ranked or not isinstance(features, dict):
        return Rejection("missing_field", "a decision needs 'ranked' (a list of 1 or more candidates) and "
                                          "'features' (an object)")
    name = _not_scalar(features)
    if name is not None:
        return Rejection("invalid_field", f"features.{name!r} {_NOT_SCALAR}")
    problem = _another_users(body, features)
    if problem is not None:
        return Rejection("invalid_field", problem)
    seen: dict[str, int] = {}
    for i, candidate in enumerate(ranked):
        problem = _candidate_problem(candidate)
        if problem is not None:
            return Rejection("invalid_field", f"ranked[{i}]: {problem}")
        # As /score refuses: the learner joins feedback to a tip's first listing, a registration's
        # training (`evaluation.examples_of`) took its last, so one reward was learned with two inputs.
        first = seen.setdefault(candidate["tip_id"], i)
        if first != i:
            return Rejection("invalid_field", f"ranked[{i}]: tip {candidate['tip_id']!r} is also ranked[{first}]; "
                                              "each candidate must be a different tip")
    return None


def served_after_stored(decision_id: str, served_ms: int | None, stored_ms: int, max_future_ms: int) -> Rejection | None:
    """Why a decision whose id says it was served at `served_ms` (`decision_ids.decision_time_ms`) cannot have been,
    JetStream having stored it at `stored_ms`; None if it can. Up to `max_future_ms` ahead is a clock's skew, as
    for an event's `ts` (`TIPSTREAM_MAX_FUTURE_S`). Further, another publisher's id in our form (a clock wrong by
    years, or a made-up id) was taken for when a request to forget a user is acted on, and every decision served
    to that user until then was forgotten with them, their reactions unlearned.

    >>> served_after_stored("d-0fffffffffff" + "0" * 16, 0x0fffffffffff, 1_765_000_000_000, 86_400_000).kind
    'future_ts'
    >>> served_after_stored("d-x", None, 0, 1), served_after_stored("d-y", 1_765_086_400_000, 1_765_000_000_000, 86_400_000)
    (None, None)
    """
    if served_ms is None or served_ms - stored_ms <= max_future_ms:
        return None
    return Rejection("future_ts", f"decision id {decision_id!r} says it was served at {_utc_text(served_ms)}, more than "
                                  f"{max_future_ms / 1000:g} s after JetStream stored it ({_utc_text(stored_ms)}): ids "
                                  "of this form ('d-', 12 hex digits of milliseconds, 16 more) tell when /score served "
                                  "them. Fix the publisher's clock, or give its decisions ids of another form "
                                  "(or raise TIPSTREAM_MAX_FUTURE_S)")


def _utc_text(ms: int) -> str:
    """`ms` for a message; `_utc` (below, for rows) is the datetime, and raises past year 9999."""
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):
        return f"{ms} ms since 1970"


def decode_decision(subject: str, data: bytes) -> LoggedDecision | Rejection:
    """The ingest `decode` for DECISIONS: parsed and checked (`decision_problem`). The learner
    parsed every decision read back anyway, for its row; it takes this body instead."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        return Rejection("invalid_json", f"decision is not valid JSON: {error}")
    if not isinstance(body, dict):
        return Rejection("invalid_json", "a decision must be a JSON object")
    problem = decision_problem(body)
    return problem if problem is not None else LoggedDecision(body["id"], data, body)


def candidate_input(tip_id: str, category: str | None, features: dict[str, Any] | None) -> dict[str, Any]:
    """A candidate's own model inputs; /score and the learner both build them here (no skew).

    >>> candidate_input("tip-1", "focus", {"length_s": 30})
    {'tip_id': 'tip-1', 'category': 'focus', 'length_s': 30}
    """
    x: dict[str, Any] = {"tip_id": tip_id}
    if category is not None:
        x["category"] = category
    if features:
        x.update(features)
    return x


def learning_input(shared: dict[str, Any], logged: dict[str, Any]) -> dict[str, Any]:
    """The model input of a logged candidate: the decision's shared features and its own.

    >>> learning_input({"hour_of_day": 8}, {"tip_id": "t", "score": 0.4, "propensity": 1.0})
    {'hour_of_day': 8, 'tip_id': 't'}
    """
    return {**shared, **candidate_input(logged["tip_id"], logged.get("category"), logged.get("features"))}


def _utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def tip_score_row(decision: dict[str, Any], data: bytes, rewards: dict[str, float] | None,
                  rewarded_at_ms: int | None) -> dict[str, Any]:
    """The `tip_scores` row of a decision (and the rewards credited to it so far); the event's
    bytes `data`, as text, only once rewarded (see `db.tip_scores`).

    >>> decision = {"id": "d-1", "ts": "2026-11-26T08:00:00.000+01:00", "user_id": "u", "model_version": "v1",
    ...             "ranked": [{"tip_id": "t", "score": 0.5, "propensity": 0.9}]}
    >>> tip_score_row(decision, b"{...}", None, None)["decision"] is None
    True
    >>> row = tip_score_row(decision, b"{...}", {"t": 1.0}, 1_795_694_400_000)
    >>> row["decision"], row["reward"], row["rewarded_at"].isoformat(), row["created_at"].isoformat()
    ('{...}', 1.0, '2026-11-26T12:00:00+00:00', '2026-11-26T07:00:00+00:00')
    """
    first = decision["ranked"][0]
    # In UTC, the same instant: `ts` keeps the caller's offset, which may be up to 23:59, and
    # SQLite reads offsets only up to 14:59, PostgreSQL up to 15:59; one such row failed every
    # later checkpoint, as it was retried with the rest.
    created = datetime.fromisoformat(decision["ts"]).astimezone(UTC)
    return {
        "decision_id": decision["id"], "user_id": decision["user_id"], "created_at": created,
        "kind": decision.get("type", DECISION_TYPE).split(".", 1)[-1], "model_version": decision["model_version"],
        "shadow_version": decision.get("shadow_version"), "prompt_version": decision.get("prompt_version"),
        # null as absent, as the check takes it (`_OPTIONAL_TEXT`): the column holds no NULL.
        "policy": decision.get("policy") or "", "tip_id": first["tip_id"], "score": first["score"],
        "propensity": first["propensity"], "decision": data.decode() if rewards else None, "rewards": rewards or None,
        "reward": (rewards or {}).get(first["tip_id"]),
        "rewarded_at": _utc(rewarded_at_ms) if rewarded_at_ms is not None else None,
    }


def _keep_rewarded(rows: dict[str, dict[str, Any]], row: dict[str, Any]) -> None:
    """`row` in `rows`, the newest of a decision winning, unless it has no rewards and the one there has."""
    held = rows.get(row["decision_id"])
    if held is None or row.get("rewards") or not held.get("rewards"):
        rows[row["decision_id"]] = row


class TipScoresLog:
    """Checkpoint participant writing `tip_scores` rows in the checkpoint's transaction.

    Rows are marked (decision logged, reward credited) on the event loop and upserted at the
    next checkpoint, together with the stream positions they reflect. A write that fails is
    retried with the next checkpoint: rows stay here until a save is confirmed (`saved`).

    A row without rewards never takes the place of one with them, here or in SQL (`write_tip_scores`):
    a decision stored twice in DECISIONS (a publisher's send again after JetStream's duplicate window, as
    the decision publisher does for those in flight through a longer NATS outage) is read back after the
    join cache let the first copy go, without its credits, and its row, written again, lost its rewards.

    >>> log = TipScoresLog()
    >>> log.mark({"decision_id": "d-1", "rewards": {"t": 1.0}})
    >>> log.mark({"decision_id": "d-1", "rewards": None})
    >>> log.snapshot()
    (1, [{'decision_id': 'd-1', 'rewards': {'t': 1.0}}])
    """

    name = "tip_scores"

    def __init__(self) -> None:
        self.dirty: dict[str, dict[str, Any]] = {}
        self._unconfirmed: dict[int, dict[str, dict[str, Any]]] = {}
        self._confirmed: list[int] = []  # appended from the checkpoint's worker thread
        self._gen = 0
        self._unconfirmed_rows = 0  # as of the last snapshot: /score reads `backlog` on every request

    def mark(self, row: dict[str, Any]) -> None:
        _keep_rewarded(self.dirty, row)

    @property
    def backlog(self) -> int:
        """Rows not known to be written (a saved checkpoint's still count until the next snapshot)."""
        return len(self.dirty) + self._unconfirmed_rows

    def snapshot(self) -> tuple[int, list[dict[str, Any]]] | None:
        while self._confirmed:
            self._unconfirmed.pop(self._confirmed.pop(), None)
        if not self.dirty and not self._unconfirmed:
            self._unconfirmed_rows = 0
            return None
        # Checkpoints run one at a time, so older generations still here failed: merge them in
        # (the newest row of a decision wins).
        rows: dict[str, dict[str, Any]] = {}
        for gen in sorted(self._unconfirmed):
            for row in self._unconfirmed.pop(gen).values():
                _keep_rewarded(rows, row)
        for row in self.dirty.values():
            _keep_rewarded(rows, row)
        self.dirty = {}
        self._gen += 1
        self._unconfirmed[self._gen] = rows
        self._unconfirmed_rows = len(rows)
        return self._gen, list(rows.values())

    write = staticmethod(write_tip_scores)

    def saved(self, snapshot: tuple[int, list[dict[str, Any]]]) -> None:
        self._confirmed.append(snapshot[0])
        DECISION_ROWS.inc(len(snapshot[1]))
