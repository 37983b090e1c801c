"""/openapi.json says what the endpoints take and answer: its bounds are the parser's own."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

from app.admin import ChangeBody, ForgetBody, RegisterBody, RollbackBody
from app.lineup import MODEL_PARAMETERS
from app.openapi import complete
from app.score_request import RequestError, parse_request
from app.settings import Settings


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from app.api import create_app, schemas

    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("openapi")))
    return complete(schemas.get_schema(routes=app.routes))


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for value in node.values() for r in _refs(value)]
    return [r for value in node for r in _refs(value)] if isinstance(node, list) else []


def test_every_operation_declares_its_parameters_and_every_ref_resolves(document: dict[str, Any]) -> None:
    """An undeclared `{version}` made six operations invalid (schemathesis refused them)."""
    paths = document["paths"]
    assert document["openapi"].startswith("3.1")  # JSON Schema: `null` in a type, `propertyNames`
    assert {"/score", "/healthz", "/readyz", "/metrics", "/users/{user_id}/features", "/models/{version}/card",
            "/admin/models", "/admin/models/{version}/promote", "/admin/rollback"} <= set(paths)
    for path, operations in paths.items():
        for method, operation in operations.items():
            declared = {p["name"] for p in operation.get("parameters", ()) if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), (path, method)
            for status, response in operation["responses"].items():
                assert isinstance(response["description"], str), (path, status)  # the YAML parsed as meant
                if int(status) >= 400:
                    assert "content" in response, (path, status)
            if path.startswith("/admin/"):
                assert operation["security"] == [{"admin": []}] and {"401", "403", "422"} <= set(map(str, operation["responses"]))
    for ref in _refs(document):
        assert ref.removeprefix("#/components/schemas/") in document["components"]["schemas"], ref


def _score(**changes: Any) -> dict[str, Any]:
    return {"user_id": "u", "candidates": [{"tip_id": "a"}], **changes}


def _refused(body: dict[str, Any]) -> str:
    with pytest.raises(RequestError) as refused:
        parse_request(orjson.dumps(body))
    return refused.value.field


def test_the_score_request_schema_holds_the_parsers_bounds(document: dict[str, Any]) -> None:
    schema = document["components"]["schemas"]["ScoreRequest"]["properties"]
    candidates = schema["candidates"]
    candidate = candidates["items"]["properties"]
    features = candidate["features"]

    def at_and_past(limit: int, make: Any, field: str) -> None:
        parse_request(orjson.dumps(make(limit)))
        assert _refused(make(limit + 1)) == field

    at_and_past(schema["user_id"]["maxLength"], lambda n: _score(user_id="u" * n), "user_id")
    at_and_past(candidates["maxItems"], lambda n: _score(candidates=[{"tip_id": f"t{i}"} for i in range(n)]),
                "candidates")
    at_and_past(candidate["tip_id"]["maxLength"], lambda n: _score(candidates=[{"tip_id": "t" * n}]),
                "candidates.0.tip_id")
    at_and_past(candidate["category"]["maxLength"], lambda n: _score(candidates=[{"tip_id": "a", "category": "c" * n}]),
                "candidates.0.category")
    at_and_past(features["maxProperties"], lambda n: _score(candidates=[{"tip_id": "a", "features": {
        f"f{i}": i for i in range(n)}}]), "candidates.0.features")
    text = next(s for s in features["additionalProperties"]["anyOf"] if s["type"] == "string")
    at_and_past(text["maxLength"], lambda n: _score(candidates=[{"tip_id": "a", "features": {"f": "x" * n}}]),
                "candidates.0.features.f")
    number = next(s for s in features["additionalProperties"]["anyOf"] if s["type"] == "number")
    for bound in (number["minimum"], number["maximum"]):
        parse_request(orjson.dumps(_score(candidates=[{"tip_id": "a", "features": {"f": bound}}])))
        assert _refused(_score(candidates=[{"tip_id": "a", "features": {"f": bound * 1.01}}])) == "candidates.0.features.f"
    [reused, read_as_the_models] = features["propertyNames"]["not"]["anyOf"]
    for name in reused["enum"]:
        assert _refused(_score(candidates=[{"tip_id": "a", "features": {name: 1}}])) == f"candidates.0.features.{name}"
    for name in ("user_id_ana", "tip_id_t-1", "category_focus"):  # a user's, a tip's, a category's weight
        assert re.search(read_as_the_models["pattern"], name)
        assert _refused(_score(candidates=[{"tip_id": "a", "features": {name: 1}}])) == f"candidates.0.features.{name}"
    assert not re.search(features["propertyNames"]["pattern"], "1st")
    assert _refused(_score(candidates=[{"tip_id": "a", "features": {"1st": 1}}])) == "candidates.0.features.1st"

    profile = schema["profile_features"]
    parse_request(orjson.dumps(_score(profile_features={name: 1 for name in profile["properties"]})))
    assert profile["additionalProperties"] is False and _refused(_score(profile_features={"iq": 1})) == "profile_features.iq"
    # Each one's own range, not any number: -1 open tasks or a preferred hour of 24 passed the
    # document and were a 422 (a fuzz campaign's bodies drawn from the document).
    for name, value in profile["properties"].items():
        field = f"profile_features.{name}"
        for bound in (value["minimum"], value["maximum"]):
            parse_request(orjson.dumps(_score(profile_features={name: bound})))
        assert _refused(_score(profile_features={name: value["minimum"] - 1})) == field
        assert _refused(_score(profile_features={name: value["maximum"] + 1})) == field
        if value["type"] == "integer":
            assert _refused(_score(profile_features={name: 0.5})) == field
        else:
            parse_request(orjson.dumps(_score(profile_features={name: value["maximum"] / 3})))
    tasks = schema["context"]["properties"]["tasks"]
    at_and_past(tasks["maxItems"], lambda n: _score(context={"tasks": [{}] * n}), "context.tasks")
    task_text = next(s for s in tasks["items"]["anyOf"] if s["type"] == "string")
    at_and_past(task_text["maxLength"], lambda n: _score(context={"tasks": ["t" * n]}), "context.tasks.0")
    for nullable in ("context", "profile_features"):  # documented as taking null, and taking it
        assert "null" in schema[nullable]["type"]
        parse_request(orjson.dumps(_score(**{nullable: None})))


def test_the_admin_body_schemas_are_the_models(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name, model in (("ChangeBody", ChangeBody), ("RegisterBody", RegisterBody), ("ForgetBody", ForgetBody),
                        ("RollbackBody", RollbackBody)):
        documented = schemas[name]
        assert set(documented["properties"]) == set(model.model_fields), name
        assert set(documented.get("required", ())) == {n for n, f in model.model_fields.items() if f.is_required()}
    assert set(schemas["RegisterBody"]["properties"]["params"]["properties"]) == set(MODEL_PARAMETERS)


def test_the_model_parameter_schemas_hold_the_models_bounds(document: dict[str, Any]) -> None:
    """A bound the document gives is the model's: at it, accepted; past it, refused by name. l2 -1
    and n_factors 2.5 ("a whole number, a fraction is cut", said the document) passed it and were a 422,
    as was an interaction of an empty input name."""
    from models.reward import TipModel

    params = document["components"]["schemas"]["RegisterBody"]["properties"]["params"]["properties"]
    assert params["interactions"]["items"]["items"]["minLength"] == 1
    with pytest.raises(ValueError, match="interactions"):
        TipModel(interactions=[["", "tip_id"]])
    for name, schema in params.items():
        if schema["type"] not in ("number", "integer"):
            continue
        if "minimum" in schema:
            TipModel(**{name: schema["minimum"]})
            with pytest.raises(ValueError, match=name):
                TipModel(**{name: schema["minimum"] - 1})
        else:
            assert "exclusiveMinimum" in schema, f"{name}: the model refuses some numbers, the document none"
            with pytest.raises(ValueError, match=name):
                TipModel(**{name: schema["exclusiveMinimum"]})
        if "maximum" in schema:
            TipModel(**{name: schema["maximum"]})
            with pytest.raises(ValueError, match=name):
                TipModel(**{name: schema["maximum"] + 1})
        if "exclusiveMaximum" in schema:
            with pytest.raises(ValueError, match=name):
                TipModel(**{name: schema["exclusiveMaximum"]})
        if schema["type"] == "integer":
            with pytest.raises(ValueError, match=f"{name} must be a whole number"):
                TipModel(**{name: schema["minimum"] + 1.5})
