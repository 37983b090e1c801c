"""Rebuild from the log: drop the database, start again, and the service knows what it knew.

docs/operations.md's procedure ("Rebuilding from the log"): stop the service, `tipstream migrate base`,
start it. With no checkpoint, SIGNALS, FEEDBACK and DECISIONS are replayed from their first
message; the first start registers a fresh `v1`, which learns from the replayed feedback.
Real nats-server, real `tipstream` processes, SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from nats.js.api import DiscardPolicy

from app import db, decision_spool
from app.decision_ids import new_decision_id
from streams.fold import to_ms
from streams.jetstream import publish_events
from streams.simulator import Population
from tests.e2e.support import TIPSTREAM, ServiceProcess, wait_until

pytestmark = pytest.mark.slow
START = to_ms(datetime(2026, 11, 20, tzinfo=UTC))
AT = "2026-11-23T09:00:00+00:00"  # features are compared at this instant, after the history
CANDIDATES = [{"tip_id": f"tip-{c}-1", "category": c} for c in ("focus", "planning", "breaks", "batching")]
STREAMS = ("SIGNALS", "FEEDBACK", "DECISIONS")


def feedback(event_id: str, user: str, decision_id: str, tip_id: str, reaction: str) -> dict[str, Any]:
    return {"id": event_id, "type": "tip.reacted", "user_id": user, "ts": "2026-11-23T08:30:00.000+00:00", "v": 1,
            "data": {"tip_id": tip_id, "decision_id": decision_id, "reaction": reaction}}


def foreign_decision(decision_id: str, user: str) -> dict[str, Any]:
    """A decision another publisher logged: an id of its own, with no time in it."""
    return {"id": decision_id, "type": "decision.scored", "v": 1, "ts": AT, "user_id": user,
            "model_version": "v1", "policy": "greedy", "features": {"user_id": user, "hour_of_day": 9},
            "ranked": [{"tip_id": c["tip_id"], "category": c["category"], "score": 0.5, "propensity": 1.0}
                       for c in CANDIDATES]}


def json_value(column: Any) -> Any:  # JSON text on SQLite, decoded on PostgreSQL
    return orjson.loads(column) if isinstance(column, str) else column


def query(url: str, sql: str) -> list[Any]:
    """The rows of `sql` as mappings, over a connection of its own (the service is another process)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql)).mappings())
    finally:
        engine.dispose()


def tip_scores(url: str) -> dict[str, dict[str, Any]]:
    rows = query(url, "select decision_id, user_id, created_at, model_version, policy, tip_id, score, propensity, "
                      "rewards, reward, decision, rewarded_at from tip_scores")
    return {r["decision_id"]: {**r, "rewards": json_value(r["rewards"])} for r in rows}


class Knowledge:
    """What the service knows, read over HTTP."""

    def __init__(self, service: ServiceProcess, users: list[str]) -> None:
        self.features = {u: service.get(f"/users/{u}/features", at=AT).json() for u in users}
        summary = service.get("/models/v1").json()
        self.n_learned, self.users_held = summary["n_learned"], summary["users_held"]
        probe = {"user_id": users[0], "explore": False, "context": {"now": AT}, "candidates": CANDIDATES}
        answer = httpx.post(f"{service.base_url}/score", json=probe, timeout=10).json()
        self.probe_id = answer["decision_id"]  # the probe is a decision too: left out of the comparison
        self.scores = {r["tip_id"]: r["score"] for r in answer["ranked"]}


def caught_up(service: ServiceProcess, last: dict[str, int], credited: float) -> bool:
    return (service.get("/readyz").status_code == 200
            and all(service.metric("tipstream_stream_position", stream=s) >= n for s, n in last.items())
            and service.metric("tipstream_feedback_total", outcome="credited") == credited)


def start_rebuilding(data_dir: Path, env: dict[str, str], patches: dict[str, Any] | None = None) -> ServiceProcess:
    """docs/operations.md's rebuild, started: `migrate base`, then `tipstream run`."""
    service = ServiceProcess(data_dir, env, patches=patches)
    migrated = subprocess.run([TIPSTREAM, "migrate", "base"], env=service.env, capture_output=True, text=True)
    assert migrated.returncode == 0, migrated.stderr
    return service.start()


def assert_as_live(database_url: str, live_rows: dict[str, dict[str, Any]], live_models: dict[str, Any]) -> None:
    assert tip_scores(database_url) == live_rows
    assert model_bytes(database_url) == live_models


def live_with_a_join_cache_of(nats_server: Any, nc: Any, database_url: str, tmp_path: Path, megabytes: str
                              ) -> tuple[Path, dict[str, str], Any, ServiceProcess]:
    """The live service with a join cache of `megabytes` (`TIPSTREAM_LEARNER_JOIN_CACHE_MB`): its data directory,
    its settings, JetStream, it."""
    data_dir = tmp_path / "data"
    env = {"NATS_URL": nats_server.url, "DATABASE_URL": database_url, "TIPSTREAM_CHECKPOINT_EVERY_S": "0.2",
           "TIPSTREAM_LEARNER_JOIN_CACHE_MB": megabytes}
    return data_dir, env, nc.jetstream(), ServiceProcess(data_dir, env).start()


async def rebuilt_counting_as_live(js: Any, service: ServiceProcess, data_dir: Path, env: dict[str, str],
                                   database_url: str) -> dict[str, float]:
    """Once the live `service` has read every stream to its end, stop it and rebuild: the rebuild counts the
    reactions `credited` and `expired` as live did, with the same rows and model bytes. Live's counts."""
    last = {name: (await js.stream_info(name)).state.last_seq for name in STREAMS}

    def read_to_the_end() -> bool:
        return all(service.metric("tipstream_stream_position", stream=s) >= n for s, n in last.items())

    wait_until(read_to_the_end, what="the live service caught up")
    outcomes = ("credited", "expired")
    live = {outcome: service.metric("tipstream_feedback_total", outcome=outcome) for outcome in outcomes}
    assert service.stop(), service.log()
    live_rows, live_models = tip_scores(database_url), model_bytes(database_url)

    service = start_rebuilding(data_dir, env)
    wait_until(lambda: service.get("/readyz").status_code == 200 and read_to_the_end(), what="the rebuild caught up")
    assert {outcome: service.metric("tipstream_feedback_total", outcome=outcome) for outcome in outcomes} == live
    assert service.stop(), service.log()
    assert_as_live(database_url, live_rows, live_models)
    return live


async def rebuild(js: Any, data_dir: Path, env: dict[str, str], users: list[str], credited: float
                  ) -> tuple[ServiceProcess, Knowledge]:
    """docs/operations.md's rebuild: `migrate base`, start again, wait for the replay; the running service
    (to stop) and what it knows."""
    service = start_rebuilding(data_dir, env)
    last = {name: (await js.stream_info(name)).state.last_seq for name in STREAMS}
    wait_until(lambda: caught_up(service, last, credited), what="the rebuild caught up")
    return service, Knowledge(service, users)


async def start_live(nats_server: Any, nc: Any, database_url: str, data_dir: Path, population: Population,
                     days: int, patches: dict[str, Any] | None = None, **settings: str
                     ) -> tuple[Any, dict[str, str], ServiceProcess]:
    """The live service, on a history of `days` of `population`'s signals: JetStream, its settings, it."""
    env = {"NATS_URL": nats_server.url, "DATABASE_URL": database_url, "TIPSTREAM_CHECKPOINT_EVERY_S": "0.2",
           **{f"TIPSTREAM_{name.upper()}": value for name, value in settings.items()}}
    service = ServiceProcess(data_dir, env, patches=patches).start()
    js = nc.jetstream()
    await publish_events(js, population.history(days=days, start_ms=START))
    return js, env, service


async def test_a_rebuild_from_the_log_equals_what_was_built_live(
    nats_server, nc, database_url: str, tmp_path: Path
) -> None:
    population = Population(users=5, seed=21)
    users = [u.user_id for u in population.users]

    # -- live -------------------------------------------------------------------------------
    js, env, service = await start_live(nats_server, nc, database_url, tmp_path / "data", population, 3,
                                        admin_token="t" * 16)
    decisions: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=service.base_url) as http:
        for index, user in enumerate(users):
            body = {"user_id": user, "context": {"now": AT}, "candidates": CANDIDATES}
            for round_ in range(2):
                answer = (await http.post("/score", json=body)).json()
                decisions[f"{user}/{round_}"] = answer["decision_id"]
    reactions = []
    # Newest decision first: reacting in an order of its own, unlike the order of DECISIONS.
    for index, user in reversed(list(enumerate(users[:4]))):  # the fifth user's come below
        for round_ in (1, 0):
            decision = decisions[f"{user}/{round_}"]
            reactions.append(feedback(f"fb-{user}-{round_}-a", user, decision, CANDIDATES[index]["tip_id"], "acted"))
            reactions.append(feedback(f"fb-{user}-{round_}-b", user, decision, CANDIDATES[3 - index]["tip_id"],
                                      "dismissed" if round_ else "disliked"))
    await publish_events(js, [("feedback.tip.reacted", event) for event in reactions])
    # A redelivery (stored twice: no Nats-Msg-Id), and feedback naming a decision nobody logged.
    await js.publish("feedback.tip.reacted", orjson.dumps(reactions[0]))
    unknown = feedback("fb-unknown", users[4], "d-nobody-logged-this", CANDIDATES[0]["tip_id"], "liked")
    await publish_events(js, [("feedback.tip.reacted", unknown)])
    credited = float(len(reactions))
    last = {name: (await js.stream_info(name)).state.last_seq for name in STREAMS}
    wait_until(lambda: caught_up(service, last, credited) and service.metric("tipstream_feedback_pending") == 1,
               what="the live service caught up")
    # Another publisher's decision, logged after the feedback naming it: that waits, and is learned
    # when the decision comes, after a reward stored in between. The rebuild reads DECISIONS ahead
    # of FEEDBACK, and learned it at its own place (in another order: other weights).
    await publish_events(js, [("feedback.tip.reacted", feedback(
        "fb-ext", users[4], "ext-1", CANDIDATES[2]["tip_id"], "acted"))])
    wait_until(lambda: service.metric("tipstream_feedback_pending") == 2, what="the reaction waiting")
    await publish_events(js, [("feedback.tip.reacted", feedback(
        "fb-mid", users[4], decisions[f"{users[4]}/0"], CANDIDATES[2]["tip_id"], "disliked"))])
    wait_until(lambda: caught_up(service, {}, credited + 1), what="the reward in between")
    await publish_events(js, [("decisions.score", {
        "id": "ext-1", "type": "decision.scored", "v": 1, "ts": AT, "user_id": users[4], "model_version": "v1",
        "policy": "greedy", "features": {"user_id": users[4], "hour_of_day": 9},
        "ranked": [{"tip_id": c["tip_id"], "category": c["category"], "score": 0.5, "propensity": 1.0}
                   for c in CANDIDATES]})])
    credited += 2
    wait_until(lambda: caught_up(service, {}, credited) and service.metric("tipstream_feedback_pending") == 1,
               what="the late decision joined")
    assert service.metric("tipstream_feedback_total", outcome="duplicate") == 1
    live = Knowledge(service, users)
    assert live.n_learned == credited
    assert service.stop(), service.log()
    live_rows = tip_scores(database_url)
    assert len(live_rows) == len(decisions) + 2 and sum(r["rewards"] is not None for r in live_rows.values()) == 10

    # -- rebuild: drop the derived state, start again ------------------------------------------
    service, rebuilt = await rebuild(js, tmp_path / "data", env, users, credited)
    assert service.metric("tipstream_feedback_total", outcome="duplicate") == 1
    assert service.metric("tipstream_feedback_pending") == 1
    assert service.stop(), service.log()
    rebuilt_rows = tip_scores(database_url)

    assert rebuilt.features == live.features
    assert rebuilt.n_learned == live.n_learned
    del rebuilt_rows[rebuilt.probe_id]
    # Every column, `rewarded_at` too: it is when the reward reached FEEDBACK, not when it was credited.
    assert rebuilt_rows == live_rows
    # Exactly: the rebuild learns the same rewards in the same order (FEEDBACK's) from the same v1.
    assert rebuilt.scores == live.scores


def resume_positions(url: str) -> tuple[int, int]:
    """FEEDBACK's position as committed in the learner's snapshot, and in the checkpoint."""
    [learner] = query(url, "select state from learner_state where name = 'learner'")
    [checkpoint] = query(url, "select seq from stream_positions where stream = 'FEEDBACK'")
    return orjson.loads(bytes(learner["state"]))["positions"]["FEEDBACK"], checkpoint["seq"]


# SQLite only: what is under test is where learning resumes after a kill, the learner's order; the first test here
# holds PostgreSQL's rows and models to a rebuild's, test_learning.py a restart's resume on it (~8 s a run).
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_kill_9_while_feedback_comes_resumes_with_the_weights_of_an_uninterrupted_run(
    nats_server, nc, database_url: str, tmp_path: Path
) -> None:
    """A learner snapshot holds the first third of the rewards. The second third is learned, and checkpointed
    (checkpoints 0.2 s apart), but in no learner snapshot (60 s apart) when the process dies: the restart
    resumes FEEDBACK from the snapshot's position, behind the checkpoint's, learns those rewards again, in the
    same order, and counts none twice, nor any the snapshot held; then the last third, which comes after it.
    The uninterrupted run is the rebuild from the same log, which the test above holds equal to live.
    The models forget a user 0.86 s (of FEEDBACK's time) after their last reaction: those who reacted
    only before the kill are forgotten as the ones after it are learned, in both runs alike."""
    population = Population(users=4, seed=5)
    users = [u.user_id for u in population.users]
    data_dir = tmp_path / "data"
    js, env, service = await start_live(nats_server, nc, database_url, data_dir, population, 2,
                                        model_snapshot_every_s="60", model_user_ttl_days="0.00001")
    reactions = []
    async with httpx.AsyncClient(base_url=service.base_url) as http:
        for index, user in enumerate(users):
            for round_ in range(3):
                body = {"user_id": user, "context": {"now": AT}, "candidates": CANDIDATES}
                decision = (await http.post("/score", json=body)).json()["decision_id"]
                reactions.append(feedback(f"fb-{user}-{round_}", user, decision, CANDIDATES[(index + round_) % 4]["tip_id"],
                                          ("acted", "disliked", "liked")[round_]))
    reactions.reverse()  # in an order of their own, unlike DECISIONS': the order AdaGrad learns in shows
    third = len(reactions) // 3
    snapshotted, replayed, after = reactions[:third], reactions[third : 2 * third], reactions[2 * third :]

    async def published(events: list[dict[str, Any]]) -> int:
        await publish_events(js, [("feedback.tip.reacted", event) for event in events])
        return (await js.stream_info("FEEDBACK")).state.last_seq

    def credited() -> float:
        return service.metric("tipstream_feedback_total", outcome="credited")

    snapshot_at = await published(snapshotted)
    wait_until(lambda: credited() == len(snapshotted), what="the first third learned")
    # A clean stop's checkpoint takes a learner snapshot, whatever their spacing: the first third's. The next start's
    # first checkpoint takes one too (the same positions), and the next is 60 s later.
    assert service.stop(), service.log()
    service = ServiceProcess(data_dir, env).start()
    wait_until(lambda: service.metric("tipstream_checkpoint_seconds_count") >= 1, what="the start's first checkpoint")
    checkpointed_at = await published(replayed)
    wait_until(lambda: credited() == len(replayed)
               and service.metric("tipstream_checkpoint_position", stream="FEEDBACK") >= checkpointed_at,
               what="the second third learned and checkpointed")
    service.kill()
    # What the restart finds: the learner's snapshot behind the checkpoint, the second third between the two.
    assert resume_positions(database_url) == (snapshot_at, checkpointed_at)

    service = ServiceProcess(data_dir, env).start()
    await published(after)
    last = {name: (await js.stream_info(name)).state.last_seq for name in STREAMS}
    wait_until(lambda: caught_up(service, last, float(len(replayed) + len(after))), what="the restart caught up")
    assert service.metric("tipstream_feedback_total", outcome="duplicate") == 0
    resumed = Knowledge(service, users)
    assert service.stop(), service.log()

    service, rebuilt = await rebuild(js, data_dir, env, users, float(len(reactions)))
    assert service.stop(), service.log()

    assert resumed.n_learned == rebuilt.n_learned == len(reactions)
    # The restart took seconds: the two users who reacted only before the kill were forgotten, the last third's held.
    assert resumed.users_held == rebuilt.users_held == 2
    assert resumed.scores == rebuilt.scores


def checkpoint_rows(url: str) -> dict[str, list[Any]]:
    """What a checkpoint writes besides the learner's rows: the stream positions and the fold's user rows."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {name: [dict(row) for row in conn.execute(sa.select(db.metadata.tables[name])).mappings()]
                    for name in CHECKPOINT_TABLES}
    finally:
        engine.dispose()


def put_back(url: str, rows: dict[str, list[Any]]) -> None:
    """Write back a checkpoint's rows (`checkpoint_rows`), the learner's rows left as they are."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for table, saved in rows.items():
                conn.execute(sa.delete(db.metadata.tables[table]))
                if saved:
                    conn.execute(sa.insert(db.metadata.tables[table]), saved)
    finally:
        engine.dispose()


CHECKPOINT_TABLES = ("stream_positions", "user_state", "user_features")


async def test_a_learner_snapshot_ahead_of_the_checkpoint_resumes_without_learning_a_reward_twice(
    nats_server, nc, database_url: str, tmp_path: Path
) -> None:
    """The learner's snapshot ahead of the checkpoint: a registry change (`Lineup` saving a new version,
    app/lineup.py) writes the learner's snapshot (`Learner.snapshot(force=True)`: credits, models, positions
    as read now) in a transaction of its own, without the fold's users or `stream_positions`; a crash before
    the next checkpoint leaves it so. Made here from two clean stops: the checkpoint's rows of the first put
    back under the learner's rows of the second. The restart re-reads FEEDBACK and DECISIONS from the
    checkpoint's positions, the older (the fold's users need what came since), so the learner reads again
    rewards its snapshot holds: each counts a duplicate, none is learned twice; then the rest is learned.
    Features, weights and learned counts as a rebuild's from the same log. Ahead here is FEEDBACK's position:
    DECISIONS' in the learner's snapshot is its oldest held decision's, behind the checkpoint's."""
    population = Population(users=4, seed=5)
    users = [u.user_id for u in population.users]
    data_dir = tmp_path / "data"
    js, env, service = await start_live(nats_server, nc, database_url, data_dir, population, 2)

    async def scored(round_: int) -> list[dict[str, Any]]:
        reactions = []
        async with httpx.AsyncClient(base_url=service.base_url) as http:
            for index, user in enumerate(users):
                body = {"user_id": user, "context": {"now": AT}, "candidates": CANDIDATES}
                decision = (await http.post("/score", json=body)).json()["decision_id"]
                reactions.append(feedback(f"fb-{user}-{round_}", user, decision,
                                          CANDIDATES[(index + round_) % 4]["tip_id"], ("acted", "disliked")[round_]))
        return reactions[::-1]  # in an order of their own, unlike DECISIONS'

    async def published(events: list[dict[str, Any]]) -> dict[str, int]:
        await publish_events(js, [("feedback.tip.reacted", event) for event in events])
        return {name: (await js.stream_info(name)).state.last_seq for name in STREAMS}

    first = await scored(0)
    last = await published(first[:2])
    wait_until(lambda: caught_up(service, last, 2.0), what="the first rewards learned")
    assert service.stop(), service.log()
    checkpointed = checkpoint_rows(database_url)

    service = ServiceProcess(data_dir, env).start()
    second = await scored(1)
    snapshotted = first[2:] + second[:2]
    last = await published(snapshotted)
    wait_until(lambda: caught_up(service, last, float(len(snapshotted))), what="the learner's snapshot's rewards")
    assert service.stop(), service.log()
    learner_at, _ = resume_positions(database_url)
    put_back(database_url, checkpointed)
    feedback_at, = (r["seq"] for r in checkpointed["stream_positions"] if r["stream"] == "FEEDBACK")
    assert resume_positions(database_url) == (learner_at, feedback_at) and learner_at > feedback_at
    assert sum(bool(r["rewards"]) for r in tip_scores(database_url).values()) == len(first[:2] + snapshotted)

    service = ServiceProcess(data_dir, env).start()
    after = second[2:]
    last = await published(after)

    def outcomes() -> dict[str, float]:
        return {outcome: service.metric("tipstream_feedback_total", outcome=outcome)
                for outcome in ("credited", "duplicate")}

    # At least the new rewards credited: a reward learned twice, or a duplicate missing, fails the assertion below
    # rather than this wait. FEEDBACK holds the rewards read back before the new ones.
    wait_until(lambda: caught_up(service, last, service.metric("tipstream_feedback_total", outcome="credited"))
               and outcomes()["credited"] >= len(after), what="the restart caught up")
    assert outcomes() == {"credited": len(after), "duplicate": len(snapshotted)}
    resumed = Knowledge(service, users)
    assert service.stop(), service.log()
    rows = tip_scores(database_url)
    del rows[resumed.probe_id]
    assert all(len(r["rewards"]) == 1 for r in rows.values() if r["rewards"]), rows
    rewarded = sum(bool(r["rewards"]) for r in rows.values())
    assert rewarded == len(first) + len(second)

    service, rebuilt = await rebuild(js, data_dir, env, users, float(rewarded))
    assert service.stop(), service.log()

    assert resumed.n_learned == rebuilt.n_learned == rewarded
    assert resumed.features == rebuilt.features
    assert resumed.scores == rebuilt.scores


def learner_snapshot_saved(url: str) -> bool:
    return bool(query(url, "select name from learner_state where name = 'learner'"))


def model_bytes(url: str) -> dict[str, tuple[int, str]]:
    """Each version's learned count and a digest of its model as the last snapshot saved it."""
    return {r["version"]: (r["n_learned"], hashlib.md5(bytes(r["model"])).hexdigest())
            for r in query(url, "select version, n_learned, model from model_versions")}


# By the clock, a silence is learned this long after it is due (5 s in the service: the time feedback stored
# before then may take to be read). Feedback here is read within milliseconds, and none is stored within a
# wait: each of the tests below waited the 5 s once or twice.
QUICK_SILENCE = {"app.silence_learning.SILENCE_READ_ALLOWANCE_MS": 500}


# SQLite only: what is under test is the learner's order; the other tests here hold PostgreSQL's rows
# and models to a rebuild's, and each silence waits seconds of the clock (~10 s a run).
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_rebuild_learns_each_silence_where_the_live_run_did(
    nats_server, nc, database_url: str, tmp_path: Path
) -> None:
    """`TIPSTREAM_SILENCE_REWARD`: live, the clock learns the silences (no feedback comes while they
    fall due); the rebuild reads FEEDBACK behind, and learns them just before the first reaction
    stored after them, or by the clock once caught up. Same rewards, same order, same rows: the
    same model, to the byte."""
    population = Population(users=3, seed=8)
    users = [u.user_id for u in population.users]
    js, env, service = await start_live(nats_server, nc, database_url, tmp_path / "data", population, 1,
                                        QUICK_SILENCE, silence_reward="0", silence_after_s="1")
    async with httpx.AsyncClient(base_url=service.base_url) as http:
        answers = [(await http.post("/score", json={"user_id": user, "context": {"now": AT}, "explore": False,
                                                    "candidates": CANDIDATES})).json() for user in users]
    answered, late, other_tip = answers
    await publish_events(js, [("feedback.tip.reacted", feedback(
        "fb-in-time", users[0], answered["decision_id"], answered["ranked"][1]["tip_id"], "liked"))])
    wait_until(lambda: service.metric("tipstream_silences_total", outcome="credited") == 2
               and service.metric("tipstream_silences_total", outcome="answered") == 1, what="two silences learned")
    # After their silence: the first tip's reaction is late; another tip's is learned.
    await publish_events(js, [("feedback.tip.reacted", event) for event in (
        feedback("fb-late", users[1], late["decision_id"], late["ranked"][0]["tip_id"], "acted"),
        feedback("fb-other", users[2], other_tip["decision_id"], other_tip["ranked"][1]["tip_id"], "acted"))])
    last = {name: (await js.stream_info(name)).state.last_seq for name in STREAMS}
    wait_until(lambda: caught_up(service, last, 2.0), what="the live service caught up")
    assert service.metric("tipstream_feedback_total", outcome="late") == 1
    live = Knowledge(service, users)  # its probe is a decision too: its silence comes by the clock
    wait_until(lambda: service.metric("tipstream_silences_total", outcome="credited") == 3, what="the probe's")
    assert service.stop(), service.log()
    live_rows, live_models = tip_scores(database_url), model_bytes(database_url)
    assert live.n_learned == 4 and live_models["v1"][0] == 5  # a reaction in time, another tip's, three silences
    assert {d: live_rows[d]["rewards"] for d in (a["decision_id"] for a in answers)} == {
        answered["decision_id"]: {answered["ranked"][1]["tip_id"]: 0.8},
        late["decision_id"]: {late["ranked"][0]["tip_id"]: 0.0},
        other_tip["decision_id"]: {other_tip["ranked"][0]["tip_id"]: 0.0, other_tip["ranked"][1]["tip_id"]: 1.0}}

    # The rebuild, stopped once it has learned what live did (no probe: it would be one more decision).
    service = start_rebuilding(tmp_path / "data", env, QUICK_SILENCE)
    last = {name: (await js.stream_info(name)).state.last_seq for name in STREAMS}
    wait_until(lambda: caught_up(service, last, 2.0)
               and service.metric("tipstream_silences_total", outcome="credited") == 3, what="the rebuild caught up")
    assert service.metric("tipstream_feedback_total", outcome="late") == 1
    features = {u: service.get(f"/users/{u}/features", at=AT).json() for u in users}
    assert service.stop(), service.log()
    assert features == live.features
    assert_as_live(database_url, live_rows, live_models)  # `rewarded_at` too: a silence is stamped with when it was due


# SQLite only: what is under test is the learner's order; the other tests here hold PostgreSQL's rows
# and models to a rebuild's, and each silence waits seconds of the clock (~10 s a run).
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_kill_9_after_silences_were_learned_and_before_their_snapshot_learns_each_once(
    nats_server, nc, database_url: str, tmp_path: Path
) -> None:
    """Silences learned by the clock, models not saved yet (snapshots 60 s apart), then kill -9: the
    restart re-reads the decisions and learns each silence again, once, and equals the rebuild from
    the same log, to the model's byte."""
    population = Population(users=3, seed=9)
    users = [u.user_id for u in population.users]
    js, env, service = await start_live(nats_server, nc, database_url, tmp_path / "data", population, 1,
                                        QUICK_SILENCE, silence_reward="0", silence_after_s="3",
                                        model_snapshot_every_s="60")
    last = {name: (await js.stream_info(name)).state.last_seq for name in STREAMS}
    wait_until(lambda: caught_up(service, last, 0.0) and model_bytes(database_url).get("v1", (None,))[0] == 0,
               what="the history read and a first snapshot saved")
    async with httpx.AsyncClient(base_url=service.base_url) as http:
        answers = [(await http.post("/score", json={"user_id": user, "context": {"now": AT}, "explore": False,
                                                    "candidates": CANDIDATES})).json() for user in users]
    # The learner's first snapshot (its decisions, no model learned yet), before anything is learned:
    # the next is 60 s later. Taken after the reaction below, it saved the model the kill must find unsaved.
    wait_until(lambda: learner_snapshot_saved(database_url), what="the learner's first snapshot")
    await publish_events(js, [("feedback.tip.reacted", feedback(
        "fb-in-time", users[0], answers[0]["decision_id"], answers[0]["ranked"][1]["tip_id"], "liked"))])
    reacted_at = (await js.stream_info("FEEDBACK")).state.last_seq
    # The reaction checkpointed too: the restart reads FEEDBACK again from the learner's snapshot, behind the checkpoint.
    wait_until(lambda: service.metric("tipstream_silences_total", outcome="credited") == 2
               and service.metric("tipstream_silences_total", outcome="answered") == 1
               and service.metric("tipstream_checkpoint_position", stream="FEEDBACK") >= reacted_at,
               what="two silences learned, the reaction checkpointed")
    assert service.get("/models/v1").json()["n_learned"] == 3
    assert model_bytes(database_url)["v1"][0] == 0, "the kill must land before the models are saved"
    service.kill()
    snapshot_at, checkpointed_at = resume_positions(database_url)
    assert snapshot_at < reacted_at == checkpointed_at

    service = ServiceProcess(tmp_path / "data", env, patches=QUICK_SILENCE).start()
    wait_until(lambda: service.metric("tipstream_silences_total", outcome="credited") == 2
               and service.metric("tipstream_feedback_total", outcome="credited") == 1, what="learned again")
    assert service.get("/models/v1").json()["n_learned"] == 3
    assert service.metric("tipstream_feedback_total", outcome="duplicate") == 0
    assert service.stop(), service.log()
    resumed_rows, resumed_models = tip_scores(database_url), model_bytes(database_url)
    assert resumed_models["v1"][0] == 3
    assert {d: resumed_rows[d]["rewards"] for d in (a["decision_id"] for a in answers)} == {
        answers[0]["decision_id"]: {answers[0]["ranked"][1]["tip_id"]: 0.8},
        answers[1]["decision_id"]: {answers[1]["ranked"][0]["tip_id"]: 0.0},
        answers[2]["decision_id"]: {answers[2]["ranked"][0]["tip_id"]: 0.0}}

    service = start_rebuilding(tmp_path / "data", env, QUICK_SILENCE)
    wait_until(lambda: caught_up(service, last, 1.0)
               and service.metric("tipstream_silences_total", outcome="credited") == 2, what="the rebuild caught up")
    assert service.stop(), service.log()
    assert_as_live(database_url, resumed_rows, resumed_models)


# SQLite only: what is under test is the learner's join; the first test here holds PostgreSQL's rows to a rebuild's.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_rebuild_credits_a_spooled_decision_s_reaction_stored_before_the_decision_as_the_start_did(
    nats_server, nc, database_url: str, tmp_path: Path
) -> None:
    """A decision the stop spooled (NATS away) reaches DECISIONS at the next start, after the app's
    reaction to it reached FEEDBACK and after decisions another publisher logged meanwhile. The start
    serves it again from the spool and credits the reaction at its place in FEEDBACK. The rebuild reads
    FEEDBACK behind DECISIONS only as far as when each chunk of feedback was stored, so the reaction
    comes first (`waiting`, most runs) and joins the decision when DECISIONS brings it: the same
    rewards, rows and model bytes as the start, and nothing left waiting."""
    data_dir = tmp_path / "data"
    env = {"NATS_URL": nats_server.url, "DATABASE_URL": database_url, "TIPSTREAM_CHECKPOINT_EVERY_S": "0.2"}
    js = nc.jetstream()
    service = ServiceProcess(data_dir, env).start()
    body = {"user_id": "u-1", "context": {"now": AT}, "explore": False, "candidates": CANDIDATES}
    async with httpx.AsyncClient(base_url=service.base_url) as http:
        served = (await http.post("/score", json=body)).json()["decision_id"]
    await publish_events(js, [("feedback.tip.reacted", feedback("fb-1", "u-1", served, CANDIDATES[0]["tip_id"], "acted"))])
    wait_until(lambda: service.metric("tipstream_feedback_total", outcome="credited") == 1, what="the first reward")
    assert service.stop(), service.log()

    spool = data_dir / decision_spool.SPOOL_NAME
    spooled = new_decision_id()
    decision_spool.save(spool, [("decisions.score", spooled, orjson.dumps(foreign_decision(spooled, "u-1")))])
    await publish_events(js, [("feedback.tip.reacted", feedback("fb-2", "u-1", spooled, CANDIDATES[1]["tip_id"], "liked"))])
    # Between the reaction and the spooled decision, more decisions than the rebuild asks for at a time
    # (TIPSTREAM_INGEST_BATCH, 64 there): FEEDBACK reads the reaction before DECISIONS brings its decision.
    await publish_events(js, [("decisions.score", foreign_decision(f"ext-{n}", "u-2")) for n in range(100)])
    service = ServiceProcess(data_dir, env).start()
    wait_until(lambda: service.metric("tipstream_feedback_total", outcome="credited") == 1 and not spool.exists(),
               what="the spooled decision published and its reaction credited")
    last = {name: (await js.stream_info(name)).state.last_seq for name in STREAMS}
    wait_until(lambda: caught_up(service, last, 1.0), what="the start caught up")
    assert service.stop(), service.log()
    live_rows, live_models = tip_scores(database_url), model_bytes(database_url)
    assert live_rows[spooled]["rewards"] == {CANDIDATES[1]["tip_id"]: 0.8} and live_models["v1"][0] == 2

    service = start_rebuilding(data_dir, {**env, "TIPSTREAM_INGEST_BATCH": "64"})
    wait_until(lambda: caught_up(service, last, 2.0), what="the rebuild caught up")
    assert service.metric("tipstream_feedback_pending") == 0
    assert service.metric("tipstream_feedback_total", outcome="unknown_decision") == 0
    assert service.stop(), service.log()
    assert_as_live(database_url, live_rows, live_models)


# SQLite only: what is under test is the learner's join; the first test here holds PostgreSQL's rows to a rebuild's.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_rebuild_learns_every_reaction_live_learned_though_the_join_cache_holds_few_decisions(
    nats_server, nc, database_url: str, tmp_path: Path
) -> None:
    """A join cache of ~15 decisions (`TIPSTREAM_LEARNER_JOIN_CACHE_MB`), 60 decisions each reacted to at once:
    live learns every reaction. The rebuild read DECISIONS as fast as it went, ahead of FEEDBACK, and the cache let
    the oldest go before their reactions were read: some 40 of 60 `expired`, another model. It now reads DECISIONS no
    further ahead of FEEDBACK than the cache holds: the same rewards, rows and model bytes as live."""
    data_dir, env, js, service = live_with_a_join_cache_of(nats_server, nc, database_url, tmp_path, "0.03")
    served = 60
    async with httpx.AsyncClient(base_url=service.base_url) as http:
        for n in range(served):
            user = f"u-{n % 7}"
            answer = (await http.post("/score", json={"user_id": user, "context": {"now": AT}, "explore": False,
                                                      "candidates": CANDIDATES})).json()
            await publish_events(js, [("feedback.tip.reacted", feedback(
                f"fb-{n}", user, answer["decision_id"], answer["ranked"][n % 4]["tip_id"], ("acted", "disliked")[n % 2]))])
            wait_until(lambda n=n: service.metric("tipstream_feedback_total", outcome="credited") == n + 1,
                       what="the reaction learned")
    last = {name: (await js.stream_info(name)).state.last_seq for name in STREAMS}
    wait_until(lambda: caught_up(service, last, served), what="the live service caught up")
    assert service.stop(), service.log()
    live_rows, live_models = tip_scores(database_url), model_bytes(database_url)
    assert live_models["v1"][0] == served

    service = start_rebuilding(data_dir, env)
    wait_until(lambda: service.get("/readyz").status_code == 200
               and all(service.metric("tipstream_stream_position", stream=s) >= n for s, n in last.items()),
               what="the rebuild caught up")
    assert service.metric("tipstream_feedback_total", outcome="expired") == 0
    assert service.metric("tipstream_feedback_total", outcome="credited") == served
    assert service.stop(), service.log()
    assert_as_live(database_url, live_rows, live_models)


# SQLite only, as the test above.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_rebuild_counts_expired_the_reactions_live_did_and_no_others(
    nats_server, nc, database_url: str, tmp_path: Path
) -> None:
    """A join cache of ~5 decisions, 12 decisions served, then their reactions newest first, three at a time with
    a decision between: live, the cache had let the oldest go, and 6 reactions of 12 were `expired`. The rebuild
    counted 8 or 9 (DECISIONS read to its end first); now the same 6, with the same rows and model bytes."""
    data_dir, env, js, service = live_with_a_join_cache_of(nats_server, nc, database_url, tmp_path, "0.012")
    answers = []
    async with httpx.AsyncClient(base_url=service.base_url) as http:
        for n in range(12):
            body = {"user_id": f"u-{n % 3}", "context": {"now": AT}, "candidates": CANDIDATES}
            answers.append((f"u-{n % 3}", (await http.post("/score", json=body)).json()))
        wait_until(lambda: service.metric("tipstream_stream_position", stream="DECISIONS") >= 12, what="logged")
        reactions = [feedback(f"fb-{n}", user, answer["decision_id"], answer["ranked"][n % 4]["tip_id"],
                              ("acted", "disliked")[n % 2]) for n, (user, answer) in enumerate(answers)]
        for start in range(0, 12, 3):
            await publish_events(js, [("feedback.tip.reacted", event) for event in reactions[::-1][start : start + 3]])
            wait_until(lambda start=start: service.metric("tipstream_stream_position", stream="FEEDBACK") >= start + 3,
                       what="the reactions read")  # before the next decision: live, served, it is held at once
            await http.post("/score", json={"user_id": "u-9", "context": {"now": AT}, "candidates": CANDIDATES})
            # Stored before the next reactions are published: a rebuild knows the order JetStream stored them in,
            # and on a loaded machine the decision, published in the background, was stored after some of them
            # (live held it from its /score on), so the rebuild's cache let one decision fewer go.
            wait_until(lambda logged=12 + start // 3 + 1: service.metric("tipstream_stream_position",
                                                                         stream="DECISIONS") >= logged,
                       what="the decision stored")
    live = await rebuilt_counting_as_live(js, service, data_dir, env, database_url)
    assert live == {"credited": 6, "expired": 6}


# SQLite only, as the tests above.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_rebuild_holds_the_decisions_live_held_when_their_reactions_came_oldest_first(
    nats_server, nc, database_url: str, tmp_path: Path
) -> None:
    """A join cache of a few decisions, four rounds of 8 decisions served, then their reactions oldest first, each
    round read before the next is served: live, the cache let each round's first ones go, the same few a round.
    The rebuild's DECISIONS, asked by FEEDBACK for the decisions stored until its reaction, also folded the next
    one (the next round's first, stored after), which took the room of a decision whose reaction was still to come:
    one more `expired` a round (6 where live counted 3). The same counts, rows and model bytes as live now."""
    data_dir, env, js, service = live_with_a_join_cache_of(nats_server, nc, database_url, tmp_path, "0.012")
    served = 0
    async with httpx.AsyncClient(base_url=service.base_url) as http:
        for round_ in range(4):
            answers = []
            for n in range(8):
                body = {"user_id": f"u-{n % 3}", "context": {"now": AT}, "candidates": CANDIDATES}
                answers.append((f"u-{n % 3}", (await http.post("/score", json=body)).json()))
            served += len(answers)
            wait_until(lambda served=served: service.metric("tipstream_stream_position", stream="DECISIONS") >= served,
                       what="logged")
            await publish_events(js, [("feedback.tip.reacted", feedback(
                f"fb-{round_}-{n}", user, answer["decision_id"], answer["ranked"][n % 4]["tip_id"],
                ("acted", "disliked")[n % 2])) for n, (user, answer) in enumerate(answers)])
            wait_until(lambda served=served: service.metric("tipstream_stream_position", stream="FEEDBACK") >= served,
                       what="the reactions read")  # before the next round: live, each is held once served
    live = await rebuilt_counting_as_live(js, service, data_dir, env, database_url)
    assert live["expired"] > 0 and live["credited"] + live["expired"] == served  # the cache let some go, live too


# SQLite only, as the tests above.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("then", ["a reaction to the last", "no more feedback"])
async def test_a_rebuild_credits_a_reaction_that_waited_for_a_decision_followed_by_more_than_the_join_cache_holds(
    nats_server, nc, database_url: str, tmp_path: Path, then: str
) -> None:
    """A reaction to another publisher's decision reaches FEEDBACK before it; then the decision and 60 more, more
    than the join cache holds (~15), then a reaction to the last, or no more feedback: live, the decision's arrival
    credits the first reaction, and the cache lets it go after. The rebuild defers the first reaction until FEEDBACK's
    time reaches the decision (`_defer`), but must first fold every decision until the second reaction (what FEEDBACK
    waits for), or all of them once FEEDBACK has reached its end: the cache let the decision go, the release found it
    gone, and the reaction live credited was given up (1 credited where live counted 2, or 0 for 1). It is credited
    as the decision leaves: the same counts, rows and model bytes as live."""
    data_dir, env, js, service = live_with_a_join_cache_of(nats_server, nc, database_url, tmp_path, "0.012")
    tips = [c["tip_id"] for c in CANDIDATES]
    await publish_events(js, [("feedback.tip.reacted", feedback("fb-1", "u-1", "ext-named", tips[0], "acted"))])
    wait_until(lambda: service.metric("tipstream_feedback_pending") == 1, what="the reaction waiting")
    await publish_events(js, [("decisions.score", foreign_decision("ext-named", "u-1"))]
                         + [("decisions.score", foreign_decision(f"ext-{n}", "u-2")) for n in range(60)])
    wait_until(lambda: service.metric("tipstream_feedback_total", outcome="credited") == 1, what="the reaction joined")
    credited = 1
    if then == "a reaction to the last":
        await publish_events(js, [("feedback.tip.reacted", feedback("fb-2", "u-2", "ext-59", tips[1], "liked"))])
        credited = 2
        wait_until(lambda: service.metric("tipstream_feedback_total", outcome="credited") == 2, what="it joined")
    live = await rebuilt_counting_as_live(js, service, data_dir, env, database_url)
    assert live == {"credited": credited, "expired": 0}


async def decisions_refused(js: Any, refused: bool) -> None:
    """DECISIONS refuses new messages (discard 'new' at its number of messages, as an operator's `nats stream edit`
    makes it), or takes them again: the publisher keeps what it refuses and sends it again within a second."""
    config = (await js.stream_info("DECISIONS")).config
    held = (await js.stream_info("DECISIONS")).state.messages
    config.discard, config.max_msgs = (DiscardPolicy.NEW, held) if refused else (DiscardPolicy.OLD, -1)
    await js.update_stream(config)


# SQLite only, as the tests above.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("then", ["a stop", "a kill -9"])
async def test_a_reaction_stored_before_its_decision_reached_decisions_is_learned_where_live_learned_it(
    nats_server, nc, database_url: str, tmp_path: Path, then: str
) -> None:
    """An app that reacts before the publisher has stored /score's decision in DECISIONS (it publishes after the
    answer, in batches; here DECISIONS refuses it for a while): the reaction is stored in FEEDBACK first, then one to
    an older decision, then the decision. Live, the decision is held from /score on, so the two are learned in
    FEEDBACK's order. Read back (a rebuild, or the restart after a kill -9, FEEDBACK replayed from a learner snapshot
    before them), DECISIONS was read only up to each reaction's stored time: the first waited for its decision, the
    second was learned before it, and AdaGrad's weights came out other than live's (other model bytes; the restart's
    scores other than live's before the kill). DECISIONS is read ahead of FEEDBACK by the publish delay's bound
    (`DECISIONS_READ_AHEAD_S`): the same rows, model bytes and scores as live. A join cache of a few decisions, fewer
    than served, so that DECISIONS is not read ahead as far as its room goes (with room, it was, or not: a race)."""
    data_dir = tmp_path / "data"
    env = {"NATS_URL": nats_server.url, "DATABASE_URL": database_url, "TIPSTREAM_CHECKPOINT_EVERY_S": "0.2",
           "TIPSTREAM_LEARNER_JOIN_CACHE_MB": "0.012", "TIPSTREAM_MODEL_SNAPSHOT_EVERY_S": "60"}
    js, service = nc.jetstream(), ServiceProcess(data_dir, env).start()
    tips = [c["tip_id"] for c in CANDIDATES]
    async with httpx.AsyncClient(base_url=service.base_url) as http:

        async def served() -> str:
            body = {"user_id": "u-1", "context": {"now": AT}, "candidates": CANDIDATES}
            return (await http.post("/score", json=body)).json()["decision_id"]

        older = [await served() for _ in range(12)]
        wait_until(lambda: service.metric("tipstream_stream_position", stream="DECISIONS") >= len(older),
                   what="the decisions logged")
        await publish_events(js, [("feedback.tip.reacted", feedback("fb-0", "u-1", older[-1], tips[0], "acted"))])
        wait_until(lambda: service.metric("tipstream_feedback_total", outcome="credited") == 1, what="it learned")
    # A clean stop's checkpoint takes a learner snapshot, and the next start's first checkpoint another with the same
    # positions: a restart replays FEEDBACK from there, before the reactions below (the next snapshot: 60 s later).
    assert service.stop(), service.log()
    service = ServiceProcess(data_dir, env).start()
    wait_until(lambda: service.metric("tipstream_checkpoint_seconds_count") >= 1, what="the start's first checkpoint")
    async with httpx.AsyncClient(base_url=service.base_url) as http:
        await decisions_refused(js, True)
        body = {"user_id": "u-1", "context": {"now": AT}, "candidates": CANDIDATES}
        quick = (await http.post("/score", json=body)).json()["decision_id"]
        await publish_events(js, [("feedback.tip.reacted", feedback("fb-quick", "u-1", quick, tips[1], "acted")),
                                  ("feedback.tip.reacted", feedback("fb-older", "u-1", older[-2], tips[2], "disliked"))])
        wait_until(lambda: service.metric("tipstream_feedback_total", outcome="credited") == 2,
                   what="both learned at once, live")
        await decisions_refused(js, False)

        async def scores() -> dict[str, float]:  # what the models say, asked with a decision of its own
            probe = {"user_id": "u-1", "explore": False, "context": {"now": AT}, "candidates": CANDIDATES}
            return {r["tip_id"]: r["score"] for r in (await http.post("/score", json=probe)).json()["ranked"]}

        live_scores = await scores()
        wait_until(lambda: service.metric("tipstream_stream_position", stream="DECISIONS") >= len(older) + 2,
                   what="the quick decision stored at last")
    last = {name: (await js.stream_info(name)).state.last_seq for name in STREAMS}
    wait_until(lambda: caught_up(service, last, 2.0) and service.metric("tipstream_checkpoint_position",
                                                                         stream="FEEDBACK") >= last["FEEDBACK"],
               what="the live service caught up and checkpointed")
    if then == "a kill -9":
        service.kill()
        assert resume_positions(database_url) == (1, 3)  # FEEDBACK is read again from the second reaction
        service = ServiceProcess(data_dir, env).start()
        wait_until(lambda: caught_up(service, last, 2.0), what="the restart caught up")
        async with httpx.AsyncClient(base_url=service.base_url) as http:
            assert await scores() == live_scores
        last["DECISIONS"] += 1
    assert service.stop(), service.log()
    live_rows, live_models = tip_scores(database_url), model_bytes(database_url)
    assert sum(bool(r["rewards"]) for r in live_rows.values()) == 3

    service = start_rebuilding(data_dir, env)
    wait_until(lambda: caught_up(service, last, 3.0), what="the rebuild caught up")
    assert service.stop(), service.log()
    assert_as_live(database_url, live_rows, live_models)
