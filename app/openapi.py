"""The OpenAPI document at /openapi.json: each route's docstring (YAML), and the schemas they
refer to, built here from the bounds the code enforces, so the document cannot drift from them.

OpenAPI 3.1: its schemas are JSON Schema, which can say what /score takes (a candidate's own
feature names, through `propertyNames`; `null` where null is accepted); 3.0 could not.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from app.score_request import (
    MAX_CANDIDATE_FEATURES,
    MAX_CANDIDATES,
    ONE_HOT_PREFIXES,
    SERVER_INPUTS,
    TIME_WITH_OFFSET,
)
from models.interactions import MAX_INTERACTIONS
from models.registry import ACTIONS
from models.reward import (
    INPUT_BOUND,
    KINDS,
    MAX_FACTORS,
    MAX_MAX_VALUES,
    MAX_USER_TTL_DAYS,
    OPTIMIZERS,
)
from streams.features import FEATURE_NAMES, FEATURES, Feature

# PostgreSQL cannot store a NUL in text: ids and text that are kept refuse it (a 422).
_NO_NUL = "^[^\\u0000]*$"


def _text(max_length: int, min_length: int = 1, stored: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": min_length, "maxLength": max_length}
    if stored:
        schema["pattern"] = _NO_NUL
    return schema


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "type": [schema["type"], "null"]}


_NUMBER = {"type": "number", "minimum": -INPUT_BOUND, "maximum": INPUT_BOUND,
           "description": f"finite, from -{INPUT_BOUND:g} to {INPUT_BOUND:g}"}


def _profile_value(feature: Feature) -> dict[str, Any]:
    """What `profile_features` takes for `feature`: the range the server computes it in
    (`Feature.problem`), within the bound on every number."""
    high = INPUT_BOUND if feature.high is None else min(feature.high, INPUT_BOUND)
    return {"type": "integer" if feature.dtype == "int" else "number", "minimum": 0, "maximum": high,
            "description": f"{feature.valid}, as the server computes it (docs/features.md)"}


_CANDIDATE = {
    "type": "object", "required": ["tip_id"], "additionalProperties": False,
    "properties": {
        "tip_id": {**_text(128), "description": "each candidate a different tip"},
        "category": _nullable(_text(64)),
        "features": {
            "type": ["object", "null"], "maxProperties": MAX_CANDIDATE_FEATURES,
            "description": "the candidate's own inputs; a name the server computes is refused, and so is one the "
                           "model would read as its own: a name starting " + ", ".join(ONE_HOT_PREFIXES) + " or a "
                           "text value making one with its name (`user` = `id_ana`), or a cross's name (`a*b=x*y`)",
            "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_.:-]*$", "maxLength": 64,
                              "not": {"anyOf": [{"enum": sorted(SERVER_INPUTS)},
                                                {"pattern": "^(" + "|".join(ONE_HOT_PREFIXES) + ")"}]}},
            "additionalProperties": {"anyOf": [_NUMBER, _text(128, min_length=0), {"type": ["boolean", "null"]}]},
        },
    },
}

SCORE_REQUEST = {
    "type": "object", "required": ["user_id", "candidates"], "additionalProperties": False,
    "properties": {
        "user_id": _text(128),
        # uniqueItems says only part of it: no two candidates may name the same tip.
        "candidates": {"type": "array", "minItems": 1, "maxItems": MAX_CANDIDATES, "uniqueItems": True,
                       "items": _CANDIDATE},
        "context": {
            "type": ["object", "null"], "additionalProperties": False,
            "properties": {
                "now": {"type": ["string", "null"], "format": "date-time",
                        "description": f"{TIME_WITH_OFFSET}, from 0001-01-01 to 9999-12-31 in UTC; default the clock. "
                                       "In Z or -00:00 (no offset told), only the instant is taken: the local "
                                       "hour and weekday are in the offset of the user's newest event"},
                "tasks": {"type": ["array", "null"], "maxItems": 1000,
                          "items": {"anyOf": [{"type": "object"}, {"type": "string", "maxLength": 256}]}},
            },
        },
        "profile_features": {
            "type": ["object", "null"], "additionalProperties": False,
            "description": "fill profile features the server lacks (a fallback); the server's own values win",
            "properties": {feature.name: _profile_value(feature) for feature in FEATURES},
        },
        "explore": {"type": "boolean", "default": True},
    },
}

_PROBABILITY = {"type": "number", "minimum": 0, "maximum": 1}

SCORE_ANSWER = {
    "type": "object", "required": ["decision_id", "model_version", "ranked", "features", "caller_features"],
    "properties": {
        "decision_id": {"type": "string"},
        "model_version": {"type": "string"},
        "ranked": {"type": "array", "items": {
            "type": "object", "required": ["tip_id", "score", "propensity"],
            "properties": {"tip_id": {"type": "string"}, "score": _PROBABILITY, "propensity": _PROBABILITY}}},
        "features": {"type": "object", "description": "the inputs shared by every candidate, as logged"},
        "caller_features": {"type": "array", "items": {"type": "string"},
                            "description": "the profile_features used (the server had only a fallback)"},
    },
}

ERROR = {
    "type": "object", "required": ["error", "field"],
    "properties": {
        "error": {"type": "string", "description": "what was wrong and, where it helps, what to do"},
        "field": {"type": ["string", "null"], "description": "the dotted path of the field at fault"},
        "errors": {"type": "array", "description": "/score: every problem found (at most 20)",
                   "items": {"type": "object", "properties": {"field": {"type": "string"},
                                                              "message": {"type": "string"}}}},
    },
}

_FEATURE_VALUE = {
    "type": "object", "required": ["value", "age_s", "fresh", "fallback"],
    "properties": {"value": {}, "age_s": {"type": ["number", "null"]}, "fresh": {"type": "boolean"},
                   "fallback": {"type": "boolean"}},
}

USER_FEATURES = {
    "type": "object", "required": ["user_id", "at", "known", "features"],
    "properties": {
        "user_id": {"type": "string"}, "at": {"type": "string", "format": "date-time"},
        "known": {"type": "boolean"},
        "features": {"type": "object", "required": list(FEATURE_NAMES), "additionalProperties": False,
                     "properties": {name: _FEATURE_VALUE for name in FEATURE_NAMES}},
    },
}

MODEL_PARAMETER_SCHEMAS = {
    "optimizer": {"type": "string", "enum": list(OPTIMIZERS)},
    "learning_rate": {"type": "number", "exclusiveMinimum": 0},
    "l2": {"type": "number", "minimum": 0},
    "intercept_lr": {"type": "number", "minimum": 0},
    "n_factors": {"type": "integer", "minimum": 1, "maximum": MAX_FACTORS, "description": "FM only"},
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1, "description": "FM only"},
    "latents": {"type": "string", "enum": ["categorical", "all"], "description": "FM only"},
    "user_forgetting": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "description": "AdaGrad only"},
    "user_ttl_days": {"type": "number", "minimum": 0, "maximum": MAX_USER_TTL_DAYS,
                      "description": "a user's own weights go this long (log time) after their last reaction; 0: kept"},
    "max_values": {"type": "integer", "minimum": 0, "maximum": MAX_MAX_VALUES,
                   "description": "the most tip ids, categories and candidates' text values it learns weights for; "
                                  "0: no bound"},
    "hour_bucket": {"type": "integer", "minimum": 1, "maximum": 24},
    "interactions": {"type": "array", "minItems": 1, "maxItems": MAX_INTERACTIONS, "description": "pairs of input names crossed into one-hots",
                     "items": {"type": "array", "minItems": 2, "maxItems": 2,
                               "items": {"type": "string", "minLength": 1}}},
}

CHANGE_BODY = {
    "type": "object", "additionalProperties": False,
    "description": "who makes the change and why, for the rollout history; an empty body takes the defaults",
    "properties": {"actor": {**_text(128), "allOf": [{"pattern": "\\S"}], "default": "admin-api",
                             "description": "who makes the change (not blank)"},
                   "note": {**_text(1000, min_length=0), "default": ""}},
}

FORGET_BODY = {
    "type": "object", "additionalProperties": False,
    "description": "who asks, kept with the request; an empty body takes the default",
    "properties": {"actor": CHANGE_BODY["properties"]["actor"]},
}

ROLLBACK_BODY = {
    "type": "object", "additionalProperties": False,
    "description": CHANGE_BODY["description"],
    "properties": {
        **CHANGE_BODY["properties"],
        "champion": {"type": ["string", "null"], "minLength": 1, "maxLength": 64, "default": None,
                     "description": "the version to roll back from: refused (409) when another is champion by then, "
                                    "so that a rollback sent twice (two operators, a retry) steps back once"},
    },
}

REGISTER_BODY = {
    "type": "object", "required": ["version"], "additionalProperties": False,
    "properties": {
        **CHANGE_BODY["properties"],
        "version": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"},
        "kind": {"type": "string", "enum": list(KINDS), "default": "logreg"},
        "params": {"type": "object", "additionalProperties": False, "properties": MODEL_PARAMETER_SCHEMAS,
                   "description": "the model's parameters; those left out take their defaults (see "
                                  "`tipstream models card v1`)"},
    },
}

# The registry's answers (`Lineup.listing`, `Lineup.describe`, `ModelCard.to_dict`, `RolloutEntry.to_dict`).
_ROLE = {"enum": ["champion", "shadow", "retired", None], "description": "null: registered, serving nobody"}

ROLLOUT_ENTRY = {
    "type": "object", "required": ["at", "action", "version", "actor", "note"],
    "properties": {"at": {"type": "string", "format": "date-time"}, "action": {"type": "string", "enum": list(ACTIONS)},
                   "version": {"type": "string"}, "actor": {"type": "string"}, "note": {"type": "string"}},
}

MODEL_CARD = {
    "type": "object", "required": ["inputs", "offline_metrics", "fairness", "rollout_history"],
    "properties": {
        "inputs": {"type": "object", "additionalProperties": {"type": "string"},
                   "description": "each input the model reads, and how; an interaction no learned example "
                                  "formed: 'interaction, never formed: ...', naming the input none had"},
        "offline_metrics": {"type": "object", "description": "progressive validation and the off-policy estimate "
                                                             "(`policy_value`) over the same stretch of the decision "
                                                             "log (empty until trained): `n` counts rewarded tips of "
                                                             "every version's decisions, `decisions` in the policy "
                                                             "value this version's decisions, one each"},
        "fairness": {"type": "object", "description": "per segmentation (tenure, timezone)"},
        "rollout_history": {"type": "array", "items": {"$ref": "#/components/schemas/RolloutEntry"}},
    },
}

MODEL_SUMMARY = {
    "type": "object", "required": ["version", "kind", "role", "created_at", "n_learned", "users_held"],
    "properties": {"version": {"type": "string"}, "kind": {"type": "string", "enum": list(KINDS)}, "role": _ROLE,
                   "created_at": {"type": "string", "format": "date-time"},
                   "n_learned": {"type": "integer", "minimum": 0, "description": "rewards learned"},
                   "users_held": {"type": ["integer", "null"], "minimum": 0,
                                  "description": "users whose own weights it holds, each forgotten after user_ttl_days "
                                                 "without a reaction; null for a version that keeps every user"}},
}

MODEL_LIST = {
    "type": "object", "required": ["champion", "shadow", "models"],
    "properties": {"champion": {"type": "string"}, "shadow": {"type": ["string", "null"]},
                   "models": {"type": "array", "items": {"$ref": "#/components/schemas/ModelSummary"}}},
}

MODEL_VERSION = {
    "type": "object", "required": [*MODEL_SUMMARY["required"], "params", "feature_names", "card"],
    "properties": {**MODEL_SUMMARY["properties"],
                   "params": {"type": "object", "description": "as registered; those left out take their defaults"},
                   "feature_names": {"type": "array", "items": {"type": "string"}},
                   "card": {"$ref": "#/components/schemas/ModelCard"}},
}

ROLES = {
    "type": "object", "required": ["champion", "shadow", "history"],
    "properties": {"champion": {"type": "string"}, "shadow": {"type": ["string", "null"]},
                   "history": {"type": "array", "maxItems": 5, "items": {"$ref": "#/components/schemas/RolloutEntry"},
                               "description": "the latest rollout history, oldest first"}},
}

_WHEN = {"type": ["string", "null"], "format": "date-time"}
_DAMAGED = {"type": "string", "description": "which of the row's columns (bounds, report) cannot be read, and why: "
            "shown as null, kept in the database as it is (moved with the record when the user is asked for again), "
            "with the fix; absent when every column can be read"}
ERASURE = {
    "type": "object", "required": ["user_id", "status", "requested_at", "requested_by"],
    "properties": {
        "user_id": {"type": "string"},
        "status": {"enum": ["requested", "dropped", "done"], "description": "requested: saved, under way; dropped: "
                   "their state, rows and the learner's hold of them are gone, their messages are being deleted; "
                   "done"},
        "requested_at": {"type": "string", "format": "date-time"}, "requested_by": {"type": "string"},
        "dropped_at": _WHEN, "done_at": _WHEN,
        "bounds": {"type": ["object", "null"], "additionalProperties": {"type": "integer"},
                   "description": "per stream, the last sequence whose messages of theirs are deleted"},
        "report": {"type": ["object", "null"], "description": "what was deleted, by where"},
        "stuck": {"type": "string", "description": "why it cannot go on, with the fix: dropped, until the service is "
                  "started again (a version's saved model the database holds damaged), or its own row damaged (asked "
                  "for again, it is replaced); absent otherwise"},
        "damaged": _DAMAGED,
        "earlier": {"type": "array", "description": "requests to forget this user done before this one, oldest first "
                    "(the user was asked for again: events of theirs came since)", "items": {
                        "type": "object", "required": ["user_id", "requested_at", "requested_by", "done_at"],
                        "properties": {"user_id": {"type": "string"},
                                       "requested_at": {"type": "string", "format": "date-time"},
                                       "requested_by": {"type": "string"}, "dropped_at": _WHEN, "done_at": _WHEN,
                                       "bounds": {"type": ["object", "null"]},
                                       "report": {"type": ["object", "null"]}, "damaged": _DAMAGED}}},
    },
}

COMPONENTS = {
    "schemas": {"ScoreRequest": SCORE_REQUEST, "ScoreAnswer": SCORE_ANSWER, "Error": ERROR,
                "UserFeatures": USER_FEATURES, "ChangeBody": CHANGE_BODY, "RegisterBody": REGISTER_BODY,
                "RollbackBody": ROLLBACK_BODY,
                "RolloutEntry": ROLLOUT_ENTRY, "ModelCard": MODEL_CARD, "ModelSummary": MODEL_SUMMARY,
                "ModelList": MODEL_LIST, "ModelVersion": MODEL_VERSION, "Roles": ROLES,
                "Erasure": ERASURE, "ForgetBody": FORGET_BODY},
    "securitySchemes": {"admin": {"type": "http", "scheme": "bearer",
                                  "description": "the server's TIPSTREAM_ADMIN_TOKEN"}},
}

BASE = {"openapi": "3.1.0", "info": {"title": "tipstream", "version": "0.1.0"}, "components": COMPONENTS}

_TEMPLATE = re.compile(r"{(\w+)}")
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


def complete(document: dict[str, Any]) -> dict[str, Any]:
    """The document of the routes' docstrings, with what every operation shares filled in:
    - each `{name}` of its path declared as a required string parameter, unless the operation
      declares it (an undeclared one makes the document invalid: clients refuse the operation);
    - a 4xx or 5xx answer without its own content has the API's error body (`Error`)."""
    document = copy.deepcopy(document)
    for path, operations in document["paths"].items():
        names = _TEMPLATE.findall(path)
        for operation in operations.values():
            declared = operation.setdefault("parameters", [])
            for name in names:
                if not any(p.get("in") == "path" and p.get("name") == name for p in declared):
                    declared.append({"name": name, "in": "path", "required": True,
                                     "schema": {"type": "string", "minLength": 1}})
            if not declared:
                del operation["parameters"]
            for status, response in operation.get("responses", {}).items():
                if int(status) >= 400 and "content" not in response:
                    response["content"] = _ERROR_CONTENT
    return document
