"""The body of `POST /score`, checked: every problem a 422 naming its field, before anything is scored.

`parse_request` reads and validates the JSON in one pass (pydantic); the few rules a schema cannot
say (distinct tips, a candidate feature reusing a name the server computes or one the model reads
as its own, a NUL the database cannot store, an unknown profile feature) are checked after it, only
where they can occur.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, NotRequired

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from typing_extensions import TypedDict  # pydantic checks typing's own only from Python 3.12

from app.request_body import field_path, not_utf8
from models.reward import INPUT_BOUND, INPUT_BOUND_TEXT
from streams.events import HALF_A_PAIR, EventTime, has_lone_surrogate, lenient_loads, text_path
from streams.features import BY_NAME as FEATURES_BY_NAME
from streams.features import CONTEXT_FEATURES, FEATURE_NAMES

MAX_CANDIDATES = 100
MAX_CANDIDATE_FEATURES = 32
# Inputs the server sets itself; a candidate's own features may not reuse these names.
SERVER_INPUTS = frozenset(FEATURE_NAMES) | {f.name for f in CONTEXT_FEATURES} | {
    "user_id", "tip_id", "category", "utc_offset_min", "is_new_user"}

# The model reads a text input `k` = `v` as the one-hot feature `k_v` (`TipModel._features`): a
# candidate's own feature read as one of these is the weight of a user, a tip or a category. Named
# `user` = "id_ana" (or `user_id_ana` = 1), it trained ana's own weight on every user's reactions,
# and brought it back after ana was forgotten.
ONE_HOT_PREFIXES = ("user_id_", "tip_id_", "category_")
# A cross is named `a*b=x*y` (`Interactions`), and no input's name holds a '*' or an '=': a text value
# making that form with its name, `user` = "id*category=ana*focus", was ana's own cross with focus.
CROSS_FORM = re.compile(r"[^*=]+\*[^*=]+=")

Identifier = Annotated[str, StringConstraints(min_length=1, max_length=128)]
FeatureName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_.:-]*$")]
FEATURE_NAME_RULE = "a feature name starts with a letter or '_', then letters, digits and '_', '.', ':', '-' only"


_OUT_OF_BOUNDS = f"must be a finite number between -{INPUT_BOUND_TEXT} and {INPUT_BOUND_TEXT}"


def _bounded(value: float) -> float:
    # pydantic's JSON parser reads NaN, Infinity and 1e400 (as inf) into floats; one such number
    # learned turned every model's predictions NaN, for every user (see `TipModel.learn_one`).
    if not -INPUT_BOUND <= value <= INPUT_BOUND:  # NaN fails it too
        raise ValueError(_OUT_OF_BOUNDS)
    return value


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return _bounded(value)
    if isinstance(value, str):
        if len(value) > 128:
            raise ValueError("a text feature may have at most 128 characters")
        return value
    raise ValueError("must be a number, a string, true/false or null")


def _number(value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number")
    return _bounded(value)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Candidate(TypedDict):
    """A checked dict, not a model: building a model instance per candidate was ~40% of
    validating a 50-candidate request (52 against 32 us)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    tip_id: Identifier
    category: NotRequired[Annotated[str, StringConstraints(min_length=1, max_length=64)] | None]
    features: NotRequired[Annotated[dict[FeatureName, Annotated[Any, AfterValidator(_scalar)]] | None,
                                    Field(max_length=MAX_CANDIDATE_FEATURES)]]


TIME_WITH_OFFSET = "an ISO 8601 time with a UTC offset, e.g. 2026-11-26T09:00:00+01:00"
# `EventTime`'s refusals, worded for a caller: a number (pydantic would read Unix time, in UTC,
# so the local hour and weekday would silently be UTC's), or an instant no datetime holds in UTC
# (the decision's `ts` is `now` in UTC: 9999-12-31T23:00-02:00 was a 500 after scoring).
_TIME_ERRORS = {
    "string_type": f"must be {TIME_WITH_OFFSET} (Unix time, a number, carries no offset)",
    "string_pattern_mismatch": f"must be {TIME_WITH_OFFSET} (Unix time, a number, carries no offset)",
    "timezone_aware": f"must be {TIME_WITH_OFFSET} (this one has no offset)",
    # An offset of 24 h or with seconds, a leap second: pydantic said "unexpected extra characters at the end
    # of the input" of a time well formed to the eye.
    "datetime_from_date_parsing": (f"must be {TIME_WITH_OFFSET}: an offset from -23:59 to +23:59 in hours and "
                                   "minutes, each field in its range (seconds 00-59)"),
    "greater_than_equal": "must be between 0001-01-01 and 9999-12-31 in UTC",
    "less_than_equal": "must be between 0001-01-01 and 9999-12-31 in UTC",
}


def _task(value: Any) -> Any:
    # One check, not a union of two types: pydantic named a union's member in the field
    # ("context.tasks.0.dict[str,any]") and reported one error per member.
    if isinstance(value, dict) or (isinstance(value, str) and len(value) <= 256):
        return value
    raise ValueError("must be an object (a task) or a string of at most 256 characters")


# RFC 9557: `Z` (and RFC 3339's `-00:00`) says the time is in UTC with the local offset unknown. It is
# what JavaScript's `toISOString()` writes, whatever the user's zone: read in it, a user of +01:00
# scored at 09:00 had the hour of 08:00. Such a `now` carries this zone, UTC by another name.
OFFSET_UNKNOWN = timezone(timedelta(0), "UTC, local offset unknown")
_UNKNOWN_OFFSET_SUFFIXES = ("Z", "z", "-00:00")


def _offset_told(value: Any, handler: ValidatorFunctionWrapHandler) -> datetime:
    moment = handler(value)
    if isinstance(value, str) and value.endswith(_UNKNOWN_OFFSET_SUFFIXES):
        return moment.replace(tzinfo=OFFSET_UNKNOWN)
    return moment


class Context(_Body):
    # The events' own rule for a time: ISO 8601 text, an offset, in range.
    now: Annotated[EventTime, WrapValidator(_offset_told)] | None = None
    tasks: list[Annotated[Any, AfterValidator(_task)]] | None = Field(None, max_length=1000)


class ScoreRequest(_Body):
    user_id: Identifier
    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_CANDIDATES)
    context: Context | None = None
    profile_features: dict[str, Annotated[Any, AfterValidator(_number)]] | None = Field(None, max_length=64)
    explore: StrictBool = True


class RequestError(Exception):
    """A bad request: `field` is the dotted path of the first problem."""

    def __init__(self, field: str, message: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message
        self.errors = errors or [{"field": field, "message": message}]

    def body(self) -> dict[str, Any]:
        return {"error": str(self), "field": self.field, "errors": self.errors}


def parse_request(body: bytes) -> ScoreRequest:
    """The validated request, or a RequestError naming the field.

    >>> parse_request(b'{"user_id": "u", "candidates": [{"tip_id": "a"}, {"tip_id": "a"}]}')
    Traceback (most recent call last):
    ...
    app.score_request.RequestError: candidates.1.tip_id: 'a' is also candidate 0; each candidate must be a different tip
    >>> try:
    ...     parse_request(b'{"user_id": "u", "candidates": [{"tip_id": 7}], "extra": 1}')
    ... except RequestError as error:
    ...     print(error.errors)
    [{'field': 'candidates.0.tip_id', 'message': 'Input should be a valid string'}, {'field': 'extra', 'message': 'Extra inputs are not permitted'}]
    """
    try:
        request = ScoreRequest.model_validate_json(body)
    except ValidationError as error:
        found = error.errors(include_url=False)
        errors = []
        for e in found[:20]:
            if e["type"] == "json_invalid":
                detail = str(e.get("ctx", {}).get("error", e["msg"]))
                where = _half_a_pair(body) if "surrogate" in detail or "hex escape" in detail else None
                if where is not None and (refused := _refused_in_whole_characters(body, where)) is not None:
                    raise refused from None
                errors.append({"field": where, "message": HALF_A_PAIR} if where is not None
                              else {"field": "body", "message": not_utf8(body) or f"not valid JSON: {detail}"})
            elif e["type"] == "model_type" and not e["loc"]:
                errors.append({"field": "body", "message": "must be a JSON object"})
            else:
                field = field_path(e["loc"])
                message = e["msg"].removeprefix("Value error, ")
                if field == "context.now":
                    message = _TIME_ERRORS.get(e["type"], message)
                elif e["type"] == "string_pattern_mismatch" and "[key]" in e["loc"]:  # the regex, said in words
                    message = FEATURE_NAME_RULE
                errors.append({"field": field, "message": message})
        raise RequestError(errors[0]["field"], errors[0]["message"], errors) from None
    if b"\\u0000" in body:  # JSON can carry a NUL only as this escape: the check costs nothing otherwise
        _refuse_nul(request)
    candidates = request.candidates
    if len({c["tip_id"] for c in candidates}) == len(candidates) and not any(c.get("features") for c in candidates):
        return _checked_profile(request)  # the common shape: distinct tips, no features of their own
    seen: dict[str, int] = {}
    for i, candidate in enumerate(candidates):
        first = seen.setdefault(candidate["tip_id"], i)
        if first != i:
            raise RequestError(f"candidates.{i}.tip_id",
                               f"{candidate['tip_id']!r} is also candidate {first}; each candidate must be a different tip")
        for name, value in (candidate.get("features") or {}).items():
            if name in SERVER_INPUTS:
                raise RequestError(f"candidates.{i}.features.{name}",
                                   f"{name!r} is a feature the server computes; give the candidate's own feature another name")
            read_as = f"{name}_{value}" if isinstance(value, str) else name
            prefix = next((p for p in ONE_HOT_PREFIXES if read_as.startswith(p)), None)
            if prefix is not None:
                raise RequestError(f"candidates.{i}.features.{name}",
                                   f"{name!r} = {value!r} is read by the model as {read_as!r}, its weight for the "
                                   f"server's own {prefix[:-1]} {read_as[len(prefix):]!r}; give the candidate's own "
                                   "feature another name")
            if prefix is None and "=" in read_as and CROSS_FORM.match(read_as):
                raise RequestError(f"candidates.{i}.features.{name}",
                                   f"{name!r} = {value!r} is read by the model as {read_as!r}, the form of its "
                                   "crosses of two inputs ('a*b=x*y'), which may be a user's own; give the "
                                   "candidate's own feature a value without '*' before '='")
    return _checked_profile(request)


def _half_a_pair(body: bytes) -> str | None:
    """The dotted path of the first text holding a lone surrogate, as JSON.stringify writes a string cut
    inside an emoji (`"\\ud83d"`): pydantic's parser refuses the body for it, and the 422 named `body`."""
    where = text_path(lenient_loads(body), has_lone_surrogate)
    return None if where is None else where or "body"


def _whole(value: Any) -> Any:
    """A JSON value with each half of a surrogate pair made '?'."""
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode()
    if isinstance(value, dict):
        return {_whole(key): _whole(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole(item) for item in value]
    return value


def _refused_in_whole_characters(body: bytes, where: str) -> RequestError | None:
    """The refusal of the text at `where`, or of a field around it, that the same body in whole
    characters gets: a field the request does not name is refused as such, whatever it holds. Told
    of the half pair first, a caller who fixed it was then told the field is unknown."""
    try:
        parse_request(json.dumps(_whole(lenient_loads(body)), allow_nan=False).encode())
    except RequestError as error:
        if any(e["field"] and (where == e["field"] or where.startswith(f"{e['field']}.")) for e in error.errors):
            return error
    except (ValueError, RecursionError):  # a number JSON cannot say (1e400 read as infinity), nesting past the stack
        pass
    return None


def _refuse_nul(request: ScoreRequest) -> None:
    # PostgreSQL cannot store a NUL in text: one logged decision with it failed every later
    # checkpoint (its tip_scores row goes with the rest), so nothing more was saved.
    def check(field: str, value: Any) -> None:
        if isinstance(value, str) and "\x00" in value:
            raise RequestError(field, "must not contain the NUL character (\\u0000); the database cannot store it")

    check("user_id", request.user_id)
    for i, c in enumerate(request.candidates):
        check(f"candidates.{i}.tip_id", c["tip_id"])
        check(f"candidates.{i}.category", c.get("category"))
        for name, value in (c.get("features") or {}).items():
            check(f"candidates.{i}.features.{name}", value)


_PROFILE_NAMES = frozenset(FEATURE_NAMES)


def _checked_profile(request: ScoreRequest) -> ScoreRequest:
    # In range, not just a number: the models scale each input by its running mean and spread,
    # so one caller's milliseconds for seconds would shift that input for every user.
    for name, value in (request.profile_features or {}).items():
        if name not in _PROFILE_NAMES:
            raise RequestError(f"profile_features.{name}",
                               f"unknown profile feature {name!r}; known: {', '.join(FEATURE_NAMES)}")
        problem = FEATURES_BY_NAME[name].problem(value)
        if problem is not None:
            raise RequestError(f"profile_features.{name}", problem)
    return request


