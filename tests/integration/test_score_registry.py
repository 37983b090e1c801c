"""The model registry: SQL persistence, admin endpoints behind a bearer token, the CLI, cards from the log."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from app import db, migrate
from app.cli import main
from app.db import make_engine
from app.learning_metrics import SHADOW_ERRORS
from app.registry_store import RegistryStore
from models.registry import ModelVersion, Registry
from tests.conftest import eventually, reset_postgres

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOW = "2026-11-26T09:00:00+01:00"


def score_body(user: str, explore: bool = True) -> dict[str, Any]:
    return {"user_id": user, "context": {"now": NOW}, "explore": explore,
            "candidates": [{"tip_id": "tip-focus-1", "category": "focus"}, {"tip_id": "tip-breaks-1", "category": "breaks"}]}


async def score_and_act(http: httpx.AsyncClient, js: Any, i: int) -> None:
    """A decision for user `u-{i}`, and their `acted` on its first tip."""
    answer = (await http.post("/score", json=score_body(f"u-{i}"))).json()
    event = {"id": f"f-{i}", "type": "tip.reacted", "user_id": f"u-{i}", "ts": NOW,
             "data": {"tip_id": answer["ranked"][0]["tip_id"], "decision_id": answer["decision_id"], "reaction": "acted"}}
    await js.publish("feedback.tip.reacted", orjson.dumps(event), headers={"Nats-Msg-Id": event["id"]})


async def five_rewards_the_first_snapshotted(http: httpx.AsyncClient, js: Any, service: Any) -> None:
    """Five decisions acted on (`score_and_act`), the models' snapshot after the first saved before the next: with
    TIPSTREAM_MODEL_SNAPSHOT_EVERY_S at an hour, no other is taken till a stop."""
    for i in range(5):
        await score_and_act(http, js, i)
        if i == 0:
            await eventually(lambda: service.learner.snapshots.last > 0 and not service.learner.snapshots.unconfirmed)


async def test_changes_are_refused_without_the_token(start_service, nc, tmp_path) -> None:
    running = await start_service()  # no TIPSTREAM_ADMIN_TOKEN
    async with running.http() as http:
        refused = await http.post("/admin/models/v1/promote", headers=AUTH)
        assert refused.status_code == 403 and "TIPSTREAM_ADMIN_TOKEN" in refused.json()["error"]
        assert "restart it with TIPSTREAM_ADMIN_TOKEN" in refused.json()["error"]  # the server's, not the client's
        # Asking where a request to forget a user is changes nothing: it was told "admin changes are disabled".
        status = await http.get("/admin/users/u-1/forget", headers=AUTH)
        assert status.status_code == 403 and "forgetting users" in status.json()["error"]
        assert (await http.get("/models")).json()["champion"] == "v1", "reads stay open"
    await running.stop()

    # A fresh data directory: `v2` as shadow is only registered on a first start.
    running = await start_service(admin_token=TOKEN, bootstrap_shadow_kind="logreg", data_dir=tmp_path / "second")
    async with running.http() as http:
        missing = await http.post("/admin/models/v2/promote")
        assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        status = await http.get("/admin/users/u-1/forget")
        assert status.status_code == 401 and "changes" not in status.json()["error"], status.json()
        wrong = await http.post("/admin/models/v2/promote", headers={"Authorization": "Bearer guess"})
        assert wrong.status_code == 403
    await running.stop()

    # Read from a file, a configured token ends with a newline: no request could ever match it.
    running = await start_service(admin_token=TOKEN + "\n", bootstrap_shadow_kind="logreg", data_dir=tmp_path / "second")
    async with running.http() as http:
        wrong = await http.post("/admin/models/v2/promote", headers={"Authorization": "Bearer guess"})
        assert wrong.status_code == 403
        assert (await http.get("/models")).json()["champion"] == "v1", "nothing changed"
        # The shadow serves nobody until promoted with the token.
        answer = (await http.post("/score", json=score_body("u-1"))).json()
        assert answer["model_version"] == "v1"
        ok = await http.post("/admin/models/v2/promote", headers=AUTH, json={"actor": "alice", "note": "ok"})
        assert ok.status_code == 200 and ok.json()["champion"] == "v2"
        assert (await http.post("/score", json=score_body("u-1"))).json()["model_version"] == "v2"


BAD_CHANGES: list[tuple[str, bytes, str]] = [
    # int(inf) was an OverflowError; a NaN or infinite rate a model of NaNs, and on PostgreSQL a 500.
    ("/admin/models", b'{"version": "v3", "params": {"hour_bucket": 1e400}}', "hour_bucket must be a finite number"),
    ("/admin/models", b'{"version": "v3", "kind": "fm", "params": {"n_factors": Infinity}}', "n_factors must be a finite"),
    ("/admin/models", b'{"version": "v3", "params": {"l2": NaN}}', "l2 must be a finite number"),
    ("/admin/models", b'{"version": "v3", "params": {"learning_rate": Infinity}}', "learning_rate must be a finite"),
    # An integer past a float's range: math.isfinite raised an OverflowError, a bare 500.
    ("/admin/models", b'{"version": "v3", "params": {"l2": 1%s}}' % (b"0" * 400),
     "l2 must be a finite number, got one past what a float holds"),
    ("/admin/models", b'{"version": "v3", "params": {"max_values": -1%s}}' % (b"0" * 320), "max_values must be a finite"),
    # Registered, then every answer naming it was a 500 (orjson: "Integer exceeds 64-bit range").
    ("/admin/models", b'{"version": "v3", "params": {"seed": 1e300}}', "seed must be between 0 and 2**32 - 1"),
    # An FM with these could not learn a single reward.
    ("/admin/models", b'{"version": "v3", "kind": "fm", "params": {"seed": -1}}', "seed must be between"),
    ("/admin/models", b'{"version": "v3", "kind": "fm", "params": {"n_factors": 0}}', "n_factors must be from 1 to 256"),
    ("/admin/models", b'{"version": "v3", "kind": "fm", "params": {"n_factors": 100000000}}', "n_factors must be from 1 to"),
    ("/admin/models", b'{"version": "v3", "params": {"interactions": []}}', "interactions must list at least one pair"),
    # Each pair is a cross for every candidate of every request: 5,000 were registered.
    ("/admin/models", b'{"version": "v3", "params": {"interactions": [%s]}}' % b", ".join([b'["category", "hour_of_day"]'] * 65),
     "interactions may list at most 64 pairs, got 65"),
    # The body's kind (default logreg) replaced it: a logreg was registered, as asked for no fm.
    ("/admin/models", b'{"version": "v3", "params": {"kind": "fm"}}', "Unknown model parameter 'kind'"),
    # Exploration is the service's setting; the list of model parameters did not say where to find it.
    ("/admin/models", b'{"version": "v3", "params": {"policy": "softmax"}}',
     ("'policy': exploration is not a version's parameter but the service's, the same for every version: set "
      "TIPSTREAM_POLICY")),
    ("/admin/models", b'{"version": "v3", "params": {"epsilon": 0.2, "learning_rate": 0.1}}',
     "'epsilon': exploration is not a version's parameter"),
    # Registered as asked, learned as any logreg (or SGD) does, and listed on its card as if it counted.
    ("/admin/models", b'{"version": "v3", "params": {"n_factors": 4}}', "n_factors applies only to kind 'fm'"),
    ("/admin/models", b'{"version": "v3", "kind": "logreg", "params": {"seed": 3, "latents": "all"}}',
     "seed, latents apply only to kind 'fm'"),
    ("/admin/models", b'{"version": "v3", "params": {"optimizer": "sgd", "user_forgetting": 0.5}}',
     "user_forgetting applies only to optimizer 'adagrad'"),
    # PostgreSQL cannot store a NUL: a bare 500.
    ("/admin/models", b'{"version": "v3", "note": "a\\u0000b"}', "note: must not contain the NUL character"),
    ("/admin/models/v2/promote", b'{"actor": "\\u0000"}', "actor: must not contain the NUL character"),
    # The registry refused it too, in words that named no field (and `field` was null).
    ("/admin/models/v2/promote", b'{"actor": "  "}', "actor: must name who makes the change"),
    # Half a surrogate pair (JSON.stringify of a text cut inside an emoji): /score names the field, a change
    # said "body: Invalid JSON: lone leading surrogate in hex escape".
    ("/admin/models/v2/promote", b'{"note": "fix \\ud83d"}', "note: holds half a UTF-16 surrogate pair"),
    ("/admin/models/v2/promote", b'{"actor": "\\udc00"}', "actor: holds half a UTF-16 surrogate pair"),
    # /score and /users/{id}/features refuse a query parameter they do not know; a change ignored it, and
    # a script's `?dry_run=true` promoted v2.
    ("/admin/models/v2/promote?dry_run=true", b'{}', "dry_run: unknown query parameter 'dry_run'"),
    # A key named "": it was "body: Extra inputs are not permitted", as if the body were the extra input.
    ("/admin/models/v2/promote", b'{"": "x"}', '"": Extra inputs are not permitted'),
    # `champion` goes in the body: given here, the rollback was made unguarded.
    ("/admin/rollback?champion=v1", b'{}', ("champion: unknown query parameter 'champion'; POST /admin/rollback "
                                            "takes no query string: its request is the JSON body")),
]


async def test_bad_changes_are_422_saying_why_and_change_nothing(start_service, nc, database_url) -> None:
    running = await start_service(database_url=database_url, admin_token=TOKEN, bootstrap_shadow_kind="logreg")
    history = len(running.service.lineup.registry.history)
    async with running.http() as http:
        before = (await http.get("/models")).json()
        for path, content, says in BAD_CHANGES:
            refused = await http.post(path, content=content, headers={**AUTH, "content-type": "application/json"})
            assert refused.status_code == 422 and says in refused.json()["error"], (content, refused.text)
        assert (await http.get("/models")).json() == before
    assert len(running.service.lineup.registry.history) == history


async def test_a_change_whose_body_is_not_sent_as_json_is_415_and_an_empty_one_needs_no_type(start_service, nc) -> None:
    """Any Content-Type was read as JSON: `curl -d` (a form's type) promoted as if it were JSON, where
    /score refuses such a body with a 415 naming the header."""
    running = await start_service(admin_token=TOKEN, bootstrap_shadow_kind="logreg")
    history = len(running.service.lineup.registry.history)
    async with running.http() as http:
        for media in (None, "application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"):
            headers = AUTH if media is None else {**AUTH, "content-type": media}
            refused = await http.post("/admin/models/v2/promote", content=b'{"note": "by curl -d"}', headers=headers)
            assert refused.status_code == 415 and refused.json()["field"] == "Content-Type", (media, refused.text)
            given = f"given: '{media.partition(';')[0]}'" if media else "given: none"
            assert "application/json" in refused.json()["error"] and given in refused.json()["error"], refused.text
        assert len(running.service.lineup.registry.history) == history
        # No body at all (curl -X POST), whatever its type says, is the empty change it always was.
        promoted = await http.post("/admin/models/v2/promote", headers={**AUTH, "content-type": "text/plain"})
        assert promoted.status_code == 200, promoted.text
        typed = await http.post("/admin/rollback", content=b"{}", headers={**AUTH, "content-type": "Application/JSON"})
        assert typed.status_code == 200, typed.text
    assert len(running.service.lineup.registry.history) == history + 2


async def test_a_version_named_in_another_case_is_told_the_one_it_may_mean(start_service, nc, tmp_path,
                                                                         monkeypatch, capsys) -> None:
    """Names are exact: `promote V2` with v2 registered was a 404 "unknown" beside a list holding v2, and V2 could be
    registered beside v2 (a training over the whole log first), each then promoted or retired for the other."""
    running = await start_service(admin_token=TOKEN, bootstrap_shadow_kind="logreg")
    registry = running.service.lineup.registry
    history = len(registry.history)
    async with running.http() as http:
        for asked in (http.post("/admin/models/V2/promote", headers=AUTH), http.get("/models/V2"),
                      http.get("/models/V2/card")):
            answer = await asked
            assert answer.status_code == 404, answer.text
            assert "No model version 'V2'; did you mean 'v2'? Version names are case-sensitive." in answer.text
        refused = await http.post("/admin/models", headers=AUTH, json={"version": "V1"})
        assert refused.status_code == 409 and refused.json()["field"] == "version", refused.text
        assert refused.json()["error"].startswith("Version 'V1' differs from the registered 'v1' only in case")
    assert sorted(registry.versions) == ["v1", "v2"] and len(registry.history) == history
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", TOKEN)
    for argv in (["promote", "V2", "--url", running.base_url], ["card", "V2"]):
        code = await asyncio.to_thread(main, ["models", *argv])
        err = capsys.readouterr().err
        assert code == 1 and "did you mean 'v2'?" in err, (argv, err)
    code = await asyncio.to_thread(main, ["models", "register", "V1", "--url", running.base_url])
    err = capsys.readouterr().err
    assert code == 1 and "409" in err and "differs from the registered 'v1' only in case" in err, err
    assert running.service.lineup.champion_version == "v1"


async def test_an_unknown_kind_is_422_naming_the_kind_field(start_service, nc) -> None:
    """It named `params`, which the body may not even have."""
    running = await start_service(admin_token=TOKEN)
    async with running.http() as http:
        refused = await http.post("/admin/models", headers=AUTH, json={"version": "v2", "kind": "svm"})
    assert refused.status_code == 422
    assert refused.json() == {"error": "kind must be one of logreg, fm; got 'svm'", "field": "kind"}


async def test_a_card_made_right_after_feedback_counts_every_reward_learned(start_service, nc) -> None:
    """The card read `tip_scores` as the last checkpoint left it: registered or evaluated within
    TIPSTREAM_CHECKPOINT_EVERY_S of a burst of feedback, it said no rewarded decisions (n 0)
    while the version had learned them all."""
    running = await start_service(admin_token=TOKEN, checkpoint_every_s=600, bootstrap_shadow_kind="logreg")
    service, js = running.service, nc.jetstream()
    async with running.http() as http:
        for i in range(3):
            await score_and_act(http, js, i)
        # A decision's row is marked when JetStream acknowledges it, which under load may come after its reward.
        await eventually(lambda: service.learner.credited == 3 and service.publisher.waiting == 0)
        registered = await http.post("/admin/models", headers=AUTH, json={"version": "v3"})
        assert registered.status_code == 200, registered.text
        assert registered.json()["card"]["offline_metrics"]["n"] == 3
        evaluated = await http.post("/admin/models/v2/evaluate", headers=AUTH)
        assert evaluated.status_code == 200, evaluated.text
        assert evaluated.json()["offline_metrics"]["n"] == 3
        # A log loss and a calibration error over 3 rewards read as well as over 3,000 without a word.
        card = (await http.get("/models/v2/card")).text
        assert "Too few to read: 3 rewards (the fairness check compares at least 30); ROC AUC from " in card, card
        # Each number says what it is, on the card itself: n counts rewarded tips, not decisions.
        assert "`n`: those tips (a decision with two reactions counts two)" in card
        assert "`calibration_error`: over ten equal score bins" in card


async def test_a_version_whose_model_overflows_on_the_log_is_422_not_500(start_service, nc) -> None:
    """A learning rate past what the weights can hold (1e308: a first step overflows) made the
    model score NaN, and the card's metrics failed on it: register and evaluate were 500s."""
    running = await start_service(admin_token=TOKEN, checkpoint_every_s=0.1)
    service, js = running.service, nc.jetstream()
    overflowing = {"version": "v2", "params": {"learning_rate": 1e308}}
    async with running.http() as http:
        assert (await http.post("/admin/models", headers=AUTH, json=overflowing)).status_code == 200  # no log yet
        for i in range(2):
            await score_and_act(http, js, i)
        await eventually(lambda: service.learner.credited == 2 and not service.decision_log.backlog)
        history = len(service.lineup.registry.history)
        before = (await http.get("/models")).json()
        evaluated = await http.post("/admin/models/v2/evaluate", headers=AUTH)
        again = await http.post("/admin/models", headers=AUTH, json={**overflowing, "version": "v3"})
        for refused in (evaluated, again):
            assert refused.status_code == 422, refused.text
            assert "learning_rate" in refused.json()["error"] and refused.json()["field"] == "params"
        assert (await http.get("/models")).json() == before
    assert len(service.lineup.registry.history) == history


async def test_a_shadow_that_diverges_logs_no_opinion_and_cannot_be_promoted(start_service, nc) -> None:
    """Registered while the log had no rewards, an overflowing model passed; its NaN scores were
    then logged as the shadow's (null), counted as learned, and its promotion succeeded, leaving
    /score to rank by the popularity prior."""
    running = await start_service(admin_token=TOKEN, checkpoint_every_s=0.1)
    service, js = running.service, nc.jetstream()
    async with running.http() as http:
        registered = await http.post("/admin/models", headers=AUTH, json={"version": "v2", "params": {"learning_rate": 1e308}})
        assert registered.status_code == 200, registered.text
        assert (await http.post("/admin/models/v2/shadow", headers=AUTH)).status_code == 200
        for i in range(3):
            await score_and_act(http, js, i)
        await eventually(lambda: service.learner.credited == 3)
        assert service.lineup.models["v2"].diverged and not service.lineup.models["v1"].diverged
        errors = SHADOW_ERRORS.value
        answer = (await http.post("/score", json=score_body("u-late"))).json()
        assert answer["model_version"] == "v1" and SHADOW_ERRORS.value == errors + 1
        logged = service.learner.joins.cache[answer["decision_id"]].decision
        assert logged["shadow"] is None and all("shadow_score" not in c for c in logged["ranked"])
        assert 'tipstream_rewards_diverged_total{version="v2"}' in (await http.get("/metrics")).text
        history = len(service.lineup.registry.history)
        refused = await http.post("/admin/models/v2/promote", headers=AUTH)
        assert refused.status_code == 409 and "diverged" in refused.json()["error"], refused.text
        assert "learning_rate" in refused.json()["error"]
    assert service.lineup.champion_version == "v1" and len(service.lineup.registry.history) == history


async def test_a_change_while_the_database_is_away_is_a_503_and_changes_nothing(start_service, nc, monkeypatch) -> None:
    """The registry is saved before a change is swapped in; a save that failed was a bare 500."""
    import sqlalchemy.exc

    running = await start_service(admin_token=TOKEN, bootstrap_shadow_kind="logreg")
    lineup = running.service.lineup

    def database_away(*args: Any, **kwargs: Any) -> None:
        raise sqlalchemy.exc.OperationalError("INSERT INTO model_rollouts", {}, ConnectionRefusedError("refused"))

    monkeypatch.setattr(lineup.store, "save", database_away)
    async with running.http() as http:
        before = (await http.get("/models")).json()
        for path, body in (("/admin/models/v2/promote", {}), ("/admin/models", {"version": "v3"})):
            refused = await http.post(path, headers=AUTH, json=body)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
            assert "database" in refused.json()["error"] and "nothing changed" in refused.json()["error"]
        assert (await http.get("/models")).json() == before
    assert lineup.champion_version == "v1" and "v3" not in lineup.models


async def test_register_shadow_promote_rollback_with_cards_and_history(start_service, nc, database_url, caplog) -> None:
    caplog.set_level("INFO", logger="tipstream.models")
    running = await start_service(database_url=database_url, admin_token=TOKEN, checkpoint_every_s=0.1)
    service = running.service
    js = nc.jetstream()
    # A decision log with rewards: 60 decisions, each reacted to.
    acted = 0
    async with running.http() as http:
        for i in range(60):
            user = f"u-{i % 20}"
            answer = (await http.post("/score", json=score_body(user))).json()
            top = answer["ranked"][0]["tip_id"]
            reaction = "acted" if (top == "tip-focus-1") == (i % 3 != 0) else "dismissed"
            acted += reaction == "acted"
            event = {"id": f"f-{i}", "type": "tip.reacted", "user_id": user, "ts": NOW,
                     "data": {"tip_id": top, "decision_id": answer["decision_id"], "reaction": reaction}}
            await js.publish("feedback.tip.reacted", orjson.dumps(event), headers={"Nats-Msg-Id": event["id"]})
        await eventually(lambda: service.learner.credited == 60)
        await eventually(lambda: not service.decision_log.backlog)
        evaluated = await http.post("/admin/models/v1/evaluate", headers=AUTH, json={"actor": "bob", "note": "weekly"})
        value = evaluated.json()["offline_metrics"]["policy_value"]["as_champion"]
        assert value["decisions"] == 60 and 0 < value["logged_reward"] < 1 and value["greedy"]["agreed"] > 0
        refreshed = evaluated.json()["rollout_history"][-1]
        assert (refreshed["action"], refreshed["actor"], refreshed["note"]) == ("evaluate", "bob", "weekly")
        assert service.lineup.champion_version == "v1"  # recorded, and no role moved

        unreachable = await http.post("/admin/models", headers=AUTH, json={"version": "../x y"})
        assert unreachable.status_code == 422 and unreachable.json()["field"] == "version"  # no path could name it
        assert unreachable.json()["error"].startswith("version: a version name is letters, digits")
        unknown = await http.post("/admin/models", headers=AUTH, json={"version": "v7", "params": {"nosuch": 1}})
        assert unknown.status_code == 422 and "Unknown model parameter 'nosuch'; known: " in unknown.json()["error"]
        registered = await http.post("/admin/models", headers=AUTH, json={
            "version": "v2", "kind": "fm", "params": {"learning_rate": 0.05, "n_factors": 4}, "actor": "alice"})
        assert registered.status_code == 200, registered.text
        card = registered.json()["card"]
        assert card["offline_metrics"]["n"] == 60 and card["offline_metrics"]["roc_auc"] is not None
        assert card["offline_metrics"]["positives"] == acted, "the AUC's classes: acted is 1, dismissed 0"
        too_few = (await http.get("/models/v2/card")).text
        assert ("Too few to read" in too_few) == (min(acted, 60 - acted) < 10), (acted, too_few)
        assert set(card["fairness"]) == {"tenure", "timezone"}
        assert card["fairness"]["timezone"]["segments"]["emea"]["n"] == 60
        assert "user_id*category" in card["inputs"]
        assert registered.json()["n_learned"] == 60, "trained over the log"

        early = await http.post("/admin/models/v2/promote", headers=AUTH)
        assert early.status_code == 409 and "tipstream models shadow v2" in early.json()["error"]
        nowhere = await http.post("/admin/models/v9/shadow", headers=AUTH)
        assert nowhere.status_code == 404 and nowhere.json()["field"] == "version", "as GET /models/v9 names it"
        assert (await http.post("/admin/models/v2/shadow", headers=AUTH, json={"actor": "bob"})).status_code == 200
        assert (await http.post("/admin/models/v2/promote", headers=AUTH, json={"actor": "bob"})).status_code == 200
        assert (await http.post("/score", json=score_body("u-1"))).json()["model_version"] == "v2"
        back = await http.post("/admin/rollback", headers=AUTH, json={"actor": "carol", "note": "AUC dropped"})
        assert back.json()["champion"] == "v1"
        assert (await http.post("/score", json=score_body("u-1"))).json()["model_version"] == "v1"
        markdown = (await http.get("/models/v2/card")).text
    assert "## Rollout history" in markdown and "| rollback | v1 | carol | from v2; AUC dropped |" in markdown
    assert "### By timezone" in markdown
    said = [r.getMessage() for r in caplog.records if r.name == "tipstream.models" and r.getMessage().startswith("models: ")]
    assert said[-3:] == ["models: shadow v2 by bob; champion v1, shadow v2",
                         "models: promote v2 by bob (replaces champion v1); champion v2, shadow -",
                         "models: rollback v1 by carol (from v2; AUC dropped); champion v1, shadow -"], said

    # Everything is in SQL, and a restart comes back with the same roles.
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        actions = conn.execute(sa.text("select action, version, actor from model_rollouts order by seq")).all()
        roles = dict(conn.execute(sa.text("select role, version from model_roles")).all())
    engine.dispose()
    assert [tuple(a) for a in actions] == [
        ("register", "v1", "tipstream"), ("promote", "v1", "tipstream"), ("evaluate", "v1", "bob"),
        ("register", "v2", "alice"), ("shadow", "v2", "bob"), ("promote", "v2", "bob"), ("rollback", "v1", "carol")]
    assert roles == {"champion": "v1"}
    learned_v2 = service.lineup.models["v2"].n_learned
    await running.stop()
    caplog.set_level("INFO", logger="tipstream")
    again = await start_service(database_url=database_url, admin_token=TOKEN)
    assert (again.service.lineup.champion_version, again.service.lineup.shadow_version) == ("v1", None)
    assert again.service.lineup.models["v2"].n_learned == learned_v2
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("models: champion ")]
    assert started[-1].startswith("models: champion v1, shadow -; learning resumes reading FEEDBACK "), started


async def test_the_cli_reads_the_database_and_changes_through_the_service(start_service, nc, tmp_path,
                                                                           monkeypatch, capsys) -> None:
    running = await start_service(admin_token=TOKEN, bootstrap_shadow_kind="logreg")
    monkeypatch.setenv("TIPSTREAM_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("TIPSTREAM_ADMIN_TOKEN", raising=False)

    async def cli(*argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = await cli("models", "list")
    assert code == 0 and "v1" in out and "champion" in out and "shadow" in out and "last save" in out
    code, out, _ = await cli("models", "card", "v1")
    assert code == 0 and out.startswith("# Model card: v1")

    code, _, err = await cli("models", "promote", "v2", "--url", running.base_url)
    assert code == 2 and "TIPSTREAM_ADMIN_TOKEN" in err
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", "")  # set, but to nothing: the same advice, not a 401
    code, _, err = await cli("models", "promote", "v2", "--url", running.base_url)
    assert code == 2 and "Set TIPSTREAM_ADMIN_TOKEN" in err
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", "wrong-token-of-the-right-length")
    code, _, err = await cli("models", "promote", "v2", "--url", running.base_url)
    assert code == 1 and "403" in err
    # A token read from a file ends with a newline: http.client refused the header with a traceback
    # that showed the token. Stripped, as the server strips its own.
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", "wr\x01ong-secret-but-long")
    code, _, err = await cli("models", "promote", "v2", "--url", running.base_url)
    assert code == 2 and "cannot carry" in err and "wr\x01ong-secret-but-long" not in err
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", TOKEN + "\n")
    code, _, err = await cli("models", "evaluate", "nosuch", "--url", running.base_url)
    assert code == 1 and "404" in err, err
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", TOKEN)
    # The version is one path segment, whatever it holds: unquoted, this promoted v2.
    code, _, err = await cli("models", "evaluate", "v2/promote?", "--url", running.base_url)
    assert code == 1 and "404" in err and running.service.lineup.champion_version == "v1"
    code, _, err = await cli("models", "promote", "v 2", "--url", running.base_url)
    assert code == 1 and "Unknown model version 'v 2'" in err
    code, _, err = await cli("models", "promote", "v2", "--url", running.base_url.removeprefix("http://"))
    assert code == 2 and f"needs its scheme, e.g. {running.base_url}" in err
    code, out, _ = await cli("models", "promote", "v2", "--url", running.base_url, "--actor", "dana", "--note", "go")
    assert code == 0 and "champion: v2" in out and "by dana: replaces champion v1; go" in out
    code, out, _ = await cli("models", "rollback", "--url", running.base_url)
    assert code == 0 and "champion: v1" in out
    code, _, err = await cli("models", "rollback", "--url", running.base_url)
    assert code == 1 and "409" in err and "no earlier champion" in err
    assert running.service.lineup.champion_version == "v1"
    code, out, _ = await cli("models", "register", "v3", "--url", running.base_url)
    assert code == 0 and out.startswith("v3 (logreg): ") and "the whole card: tipstream models card v3" in out
    code, out, _ = await cli("models", "evaluate", "v3", "--json", "--url", running.base_url)
    assert code == 0 and "offline_metrics" in json.loads(out)
    code, out, _ = await cli("models", "retire", "v3", "--url", running.base_url)
    assert code == 0 and " retire v3 by " in out and not out.rstrip().endswith(":")  # no note: no colon before nothing


def test_the_registry_round_trips_through_sql_and_migrations_go_down(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    store = RegistryStore(engine)
    clock_at = [datetime(2026, 11, 26, tzinfo=UTC)]

    def clock() -> datetime:
        clock_at[0] += timedelta(minutes=1)
        return clock_at[0]

    reg = Registry(clock=clock)
    for v in ("v1", "v2", "v3"):
        reg.register(ModelVersion(v, "logreg", {"learning_rate": 0.1, "interactions": [["a", "b"]]}, ["a"], clock()),
                     actor="ci")
    reg.bootstrap("v1", actor="ops")
    store.save(reg, known_entries=0, new_models={"v1": (b"model-1", 3)})
    saved = len(reg.history)
    reg.set_shadow("v2", actor="ops")
    reg.promote("v2", actor="ops")
    reg.set_shadow("v3", actor="ops")
    reg.promote("v3", actor="ops")
    reg.rollback(actor="ops")
    reg.retire("v1", actor="ops", note="old")
    store.save(reg, known_entries=saved, new_models={})
    loaded, models = store.load()
    assert loaded.to_dict() == reg.to_dict()
    assert models["v1"] == (b"model-1", 3) and models["v2"] == (None, 0)
    engine.dispose()

    migrate.downgrade(database_url, "0001")
    names = set(sa.inspect(sa.create_engine(database_url)).get_table_names())
    assert "tip_scores" not in names and "model_versions" not in names and "user_state" in names
    migrate.upgrade(database_url)
    if database_url.startswith("postgresql"):
        reset_postgres(database_url)


def test_the_registry_reads_back_in_utc_whatever_the_server_s_time_zone(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PostgreSQL hands back a timestamptz in the session's zone, which initdb sets to the host's:
    on such a server every registry time (cards, rollout history, `models list`) read back in it,
    '2026-11-25T20:31:00-03:30' beside the UTC of everything else and of the entries added since."""
    monkeypatch.setenv("PGTZ", "America/St_Johns")  # libpq's: the session's zone, as the server's default would
    reset_postgres(postgres_url)
    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url)
    try:
        reg = Registry(clock=lambda: datetime(2026, 11, 26, 0, 1, tzinfo=UTC))
        reg.register(ModelVersion("v1", "logreg", {}, ["a"], datetime(2026, 11, 26, tzinfo=UTC)), actor="ci")
        reg.bootstrap("v1", actor="ops")
        RegistryStore(engine).save(reg, known_entries=0, new_models={})
        loaded, _ = RegistryStore(engine).load()
        assert loaded.to_dict() == reg.to_dict()
        assert loaded.history[0].at.isoformat() == "2026-11-26T00:01:00+00:00"
    finally:
        engine.dispose()
        reset_postgres(postgres_url)


def test_tip_scores_rows_keep_their_decision_across_0003(database_url: str) -> None:
    """0003 lets an unrewarded row go without the decision's text, keeping the text of every
    row that has it; going down fills the gaps, as the older schema requires text."""
    migrate.upgrade(database_url, "0002")
    row = {"user_id": "u-1", "created_at": datetime(2026, 11, 26, tzinfo=UTC), "kind": "scored",
           "model_version": "v1", "policy": "greedy", "tip_id": "t", "score": 0.5, "propensity": 1.0}
    insert = sa.text("insert into tip_scores (decision_id, user_id, created_at, kind, model_version, policy, tip_id, "
                     "score, propensity, decision) values (:decision_id, :user_id, :created_at, :kind, "
                     ":model_version, :policy, :tip_id, :score, :propensity, :decision)")
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert, {**row, "decision_id": "d-old", "decision": '{"id": "d-old"}'})
        migrate.upgrade(database_url)
        with engine.begin() as conn:
            conn.execute(insert, {**row, "decision_id": "d-new", "decision": None})
        read = sa.text("select decision_id, decision from tip_scores order by decision_id")
        with engine.connect() as conn:
            assert conn.execute(read).all() == [("d-new", None), ("d-old", '{"id": "d-old"}')]
        migrate.downgrade(database_url, "0002")
        with engine.connect() as conn:
            assert conn.execute(read).all() == [("d-new", "null"), ("d-old", '{"id": "d-old"}')]
    finally:
        engine.dispose()
        migrate.upgrade(database_url)
        if database_url.startswith("postgresql"):
            reset_postgres(database_url)


def test_0004_puts_rewarded_decision_times_in_utc(database_url: str) -> None:
    """A rewarded row written with the user's wall-clock time reads back as the instant of its ts."""
    migrate.upgrade(database_url, "0003")
    engine = sa.create_engine(database_url)
    insert = sa.text("insert into tip_scores (decision_id, user_id, created_at, kind, model_version, policy, tip_id, "
                     "score, propensity, decision) values (:decision_id, 'u', :created_at, 'scored', 'v1', 'greedy', "
                     "'t', 0.5, 1.0, :decision)")
    tokyo = '{"id": "d-tokyo", "ts": "2026-11-26T16:00:00.250+09:00"}'
    try:
        with engine.begin() as conn:
            if database_url.startswith("sqlite"):  # as 0003-era code stored it: the wall clock, no offset
                wall = "2026-11-26 16:00:00.250000"
            else:
                wall = datetime(2026, 11, 26, 7, 0, 0, 250000, tzinfo=UTC)
            conn.execute(insert, {"decision_id": "d-tokyo", "created_at": wall, "decision": tokyo})
            conn.execute(insert, {"decision_id": "d-unrewarded", "created_at": wall, "decision": None})
        migrate.upgrade(database_url)
        with engine.connect() as conn:
            rows = dict(conn.execute(sa.select(db.tip_scores.c.decision_id, db.tip_scores.c.created_at)).all())
        as_utc = {k: v if v.tzinfo else v.replace(tzinfo=UTC) for k, v in rows.items()}
        assert as_utc["d-tokyo"] == datetime(2026, 11, 26, 7, 0, 0, 250000, tzinfo=UTC)
        if database_url.startswith("sqlite"):
            assert rows["d-unrewarded"] == datetime(2026, 11, 26, 16, 0, 0, 250000)  # no offset to read: left alone
    finally:
        engine.dispose()
        if database_url.startswith("postgresql"):
            reset_postgres(database_url)


def test_0004_reads_every_offset_a_decision_may_carry(database_url: str) -> None:
    """`context.now` may carry an offset up to 23:59 (`test_score_api`), and 0003-era code stored
    its wall clock on SQLite. SQLite's strftime reads offsets only up to 14:59: it gave NULL for
    the others, the NOT NULL `created_at` refused it, and the upgrade failed, so no release after
    0003 could start on that database."""
    migrate.upgrade(database_url, "0003")
    engine = sa.create_engine(database_url)
    row = {"user_id": "u", "kind": "scored", "model_version": "v1", "policy": "greedy", "tip_id": "t",
           "score": 0.5, "propensity": 1.0, "rewards": {"t": 1.0}, "reward": 1.0,
           "rewarded_at": datetime(2026, 11, 27, tzinfo=UTC)}
    served = {"d-east": "2026-11-26T16:00:00.250+23:59", "d-west": "2026-11-26T16:00:00.250-15:30",
              "d-tokyo": "2026-11-26T16:00:00.250+09:00"}
    try:
        with engine.begin() as conn:  # as 0003-era code wrote them: SQLAlchemy's own DateTime
            conn.execute(db.tip_scores.insert(), [
                {**row, "decision_id": key, "created_at": datetime.fromisoformat(ts),
                 "decision": json.dumps({"id": key, "ts": ts})} for key, ts in served.items()])
        migrate.upgrade(database_url)
        with engine.connect() as conn:
            rows = dict(conn.execute(sa.select(db.tip_scores.c.decision_id, db.tip_scores.c.created_at)).all())
        as_utc = {k: v if v.tzinfo else v.replace(tzinfo=UTC) for k, v in rows.items()}
        assert as_utc == {key: datetime.fromisoformat(ts).astimezone(UTC) for key, ts in served.items()}
    finally:
        engine.dispose()
        if database_url.startswith("postgresql"):
            reset_postgres(database_url)


async def test_a_clean_stop_saves_the_learner_where_the_streams_stand(start_service, nc) -> None:
    """Snapshots of the models are spaced (TIPSTREAM_MODEL_SNAPSHOT_EVERY_S); the last one is
    taken at a clean stop, so the next start replays no feedback into the models."""
    running = await start_service(model_snapshot_every_s=3600, checkpoint_every_s=0.1)
    service = running.service
    js = nc.jetstream()
    async with running.http() as http:
        await five_rewards_the_first_snapshotted(http, js, service)
    await eventually(lambda: service.learner.credited == 5)
    await running.stop()
    again = await start_service(model_snapshot_every_s=3600)
    with again.service.engine.connect() as conn:
        saved = orjson.loads(conn.execute(sa.select(db.learner_state.c.state).where(
            db.learner_state.c.name == "learner")).scalar_one())
        feedback = conn.execute(sa.select(db.stream_positions.c.seq).where(
            db.stream_positions.c.stream == "FEEDBACK")).scalar_one()
    assert saved["positions"]["FEEDBACK"] == feedback == 5
    assert again.service.lineup.champion.n_learned == 5


async def test_two_rollbacks_meant_for_one_champion_roll_back_once(start_service, nc, monkeypatch, capsys) -> None:
    """Two operators undoing one bad promotion, or a rollback sent again, rolled back twice: past the champion
    before it too (h120 ran two `tipstream models rollback` at once: m3, m2, then v1 served). Naming the
    champion rolled back from (`champion`, the CLI's --from) makes the second a 409 that changes nothing."""
    from app import models_cli

    running = await start_service(admin_token=TOKEN)
    async with running.http() as http:
        for v in ("v2", "v3"):
            assert (await http.post("/admin/models", headers=AUTH, json={"version": v})).status_code == 200
            for step in ("shadow", "promote"):
                assert (await http.post(f"/admin/models/{v}/{step}", headers=AUTH)).status_code == 200
        first = await http.post("/admin/rollback", headers=AUTH, json={"champion": "v3", "actor": "alice"})
        assert first.status_code == 200 and first.json()["champion"] == "v2"
        again = await http.post("/admin/rollback", headers=AUTH, json={"champion": "v3", "actor": "bob"})
        assert again.status_code == 409 and again.json()["field"] == "champion", again.text
        assert "'v2' is, since its rollback by alice at " in again.json()["error"]
        assert running.service.lineup.champion_version == "v2"
        assert (await http.post("/admin/models/v3/promote", headers=AUTH)).status_code == 200

    # The CLI's --from: another operator's rollback lands just before its own.
    call = models_cli.admin_call

    def another_first(url: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        if path == "/admin/rollback":
            assert httpx.post(f"{running.base_url}/admin/rollback", headers=AUTH).json()["champion"] == "v2"
        return call(url, path, *args, **kwargs)

    monkeypatch.setattr(models_cli, "admin_call", another_first)
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", TOKEN)
    code = await asyncio.to_thread(main, ["models", "rollback", "--from", "v3", "--url", running.base_url])
    err = capsys.readouterr().err
    assert code == 1 and "refused (409): Version 'v3' is not the champion: 'v2' is, since its rollback by" in err, err
    assert running.service.lineup.champion_version == "v2"


async def test_a_change_sent_to_a_url_with_a_path_says_the_path_went_before_its_own(
        start_service, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`--url http://host:port/admin` sent POST /admin/admin/rollback: a 404 that named the doubled path
    and nothing more."""
    running = await start_service(admin_token=TOKEN)
    monkeypatch.setenv("TIPSTREAM_ADMIN_TOKEN", TOKEN)
    code = await asyncio.to_thread(main, ["models", "rollback", "--url", f"{running.base_url}/admin"])
    err = capsys.readouterr().err
    assert code == 1 and "POST /admin/admin/rollback: Not Found" in err, err
    assert "--url ends in a path (/admin), which goes before /admin/rollback" in err, err
    assert running.service.lineup.champion_version == "v1"


async def test_a_retired_version_keeps_the_rewards_it_had_learned_across_a_restart(start_service, nc) -> None:
    """No checkpoint saves a retired version's model any more: its count was the last snapshot's, and
    GET /models said fewer rewards learned after a restart than before it (h120 ran it)."""
    running = await start_service(admin_token=TOKEN, bootstrap_shadow_kind="logreg", model_snapshot_every_s=3600,
                                  checkpoint_every_s=0.1)
    service = running.service
    js = nc.jetstream()
    async with running.http() as http:
        await five_rewards_the_first_snapshotted(http, js, service)
        await eventually(lambda: service.learner.credited == 5)
        assert (await http.post("/admin/models/v2/retire", headers=AUTH)).status_code == 200
        before = {m["version"]: m["n_learned"] for m in (await http.get("/models")).json()["models"]}
    assert before == {"v1": 5, "v2": 5}
    await running.stop()
    again = await start_service(admin_token=TOKEN, bootstrap_shadow_kind="logreg")
    assert {v: m.n_learned for v, m in again.service.lineup.models.items()} == before


def rewarded_rows(count: int) -> list[dict[str, Any]]:
    """`tip_scores` rows of `count` rewarded decisions, each of a user of its own."""
    from app.decision_ids import decision_time_ms, new_decision_id
    from app.decisions import tip_score_row

    rows = []
    for i in range(count):
        decision_id = new_decision_id()
        decision = {"id": decision_id, "ts": NOW, "user_id": f"u-{i}", "model_version": "v1",
                    "features": {"user_id": f"u-{i}", "hour_of_day": i % 24, "utc_offset_min": 60},
                    "ranked": [{"tip_id": f"tip-{c}-1", "category": c, "score": 0.5, "propensity": 0.5}
                               for c in ("focus", "breaks")]}
        rows.append(tip_score_row(decision, orjson.dumps(decision), {"tip-focus-1": float(i % 2)},
                                  decision_time_ms(decision_id)))
    return rows


async def test_a_registration_over_a_large_log_leaves_the_event_loop_free(start_service, nc) -> None:
    """Training over the log ran in a thread, where a factorisation machine gave the event loop the
    GIL only in turns: it releases the GIL for an instant at each new latent vector (one per user),
    and CPython then never forces a switch. /score waited 0.3-1.2 s at a time over 20k users, 70% of
    the registration. Measured as that share, not as the longest wait: one wait of 0.3 s came of a
    machine under load from outside (a longest of 0.04 s here, 0.1 s beside three busy processes)."""
    running = await start_service(admin_token=TOKEN)
    engine = make_engine(running.service.settings.sqlalchemy_url)
    with engine.begin() as conn:
        db.upsert(conn, db.tip_scores, rewarded_rows(15_000), ["decision_id"])
    engine.dispose()
    waits: list[float] = []
    registering = True

    async def watch_the_loop() -> None:
        loop = asyncio.get_running_loop()
        while registering:
            started = loop.time()
            await asyncio.sleep(0.005)
            waits.append(loop.time() - started)

    watching = asyncio.create_task(watch_the_loop())
    async with httpx.AsyncClient(base_url=running.base_url, timeout=120) as http:
        answer = await http.post("/admin/models", headers=AUTH, json={"version": "v2", "kind": "fm"})
    registering = False
    await watching
    assert answer.status_code == 200, answer.text
    assert answer.json()["n_learned"] == 15_000
    stood_still = sum(wait for wait in waits if wait > 0.1)
    assert stood_still < 0.25 * sum(waits), (
        f"the event loop stood still for {stood_still:.2f} s of {sum(waits):.2f} (longest {max(waits):.3f} s)")


async def test_an_actor_or_note_with_a_line_break_is_one_line_of_the_log(start_service, nc, caplog) -> None:
    # "\n<a time> INFO tipstream.models: models: promote v3 by alice" was a second line, read as the service's own.
    caplog.set_level(logging.INFO, logger="tipstream.models")
    running = await start_service(admin_token=TOKEN)
    forged = "\n2026-12-06 01:00:00,000 INFO tipstream.models: models: promote v3 by alice"
    async with running.http() as http:
        changed = await http.post("/admin/models", headers=AUTH,
                                  json={"version": "v2", "actor": "eve" + forged, "note": "n" + forged})
        assert changed.status_code == 200, changed.text
    await running.stop()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("models: register v2")]
    assert len(said) == 1 and "\n" not in said[0] and "by eve\\n2026-12-06" in said[0], said


async def test_the_registry_reads_refuse_a_query_string_they_would_ignore(start_service) -> None:
    """As the changes and /users/{id}/features refuse what they do not take: ignored, `/models/v1/card?format=json`
    answered Markdown, `/models?role=shadow` every version and the forget status `?user=u-2` u-1's."""
    running = await start_service(admin_token=TOKEN)
    async with running.http() as http:
        for target, name, headers in [("/models?role=shadow", "role", {}), ("/models/v1?x=1", "x", {}),
                                      ("/models/v1/card?format=json", "format", {}),
                                      ("/admin/users/u-1/forget?user=u-2", "user", AUTH)]:
            answer = await http.get(target, headers=headers)
            assert answer.status_code == 422, (target, answer.text)
            path = target.split("?")[0]
            assert answer.json() == {"error": f"{name}: unknown query parameter {name!r}; GET {path} takes no query "
                                              "string", "field": name}, target
        assert (await http.get("/models")).status_code == 200
        assert (await http.get("/models/v1/card")).status_code == 200
