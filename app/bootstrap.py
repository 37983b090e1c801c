"""Composition root: settings -> database -> NATS -> streams -> checkpoint -> ingest -> API.

Start-up steps, in order:
1. Apply migrations (alembic upgrade head).
2. Start the embedded nats-server if NATS_URL is unset; connect (tried for TIPSTREAM_NATS_CONNECT_TIMEOUT_S).
3. Create or update the streams.
4. Load the latest checkpoint into the online store.
5. Re-create each durable consumer at its checkpointed position + 1 and start ingest.
6. Start the checkpointer, the offline features and the tip_scores retention. Shutdown runs the
   steps backwards and writes a last checkpoint.

Learning (docs/learning.md) joins in at step 4: the model registry and the learner's last
snapshot are loaded, and FEEDBACK and DECISIONS are re-read from the positions that snapshot
reflects; at step 5 the FEEDBACK ingest feeds the learner, a DECISIONS ingest reads the
decision log back until caught up (then only what others publish: `decision_tail.py`), and the
decision publisher starts.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import random
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import orjson

from app import decision_spool, loop_lag, migrate, version
from app.background import BackgroundTasks
from app.checkpoint_stores import SqlCheckpointStore
from app.checkpoint_writer import CheckpointWriter
from app.checkpoints import Checkpointer
from app.collector import FreezePolicy
from app.db import autovacuum_is_off, briefly, make_engine, one_line, refuse_read_only, refused_by_setting
from app.decision_publisher import DecisionPublisher, short_duplicate_window
from app.decision_tail import OwnTail
from app.decisions import TipScoresLog, decode_decision
from app.embedded_nats import STORE_DIR, URL_FILE, EmbeddedNats, write_private
from app.erasure import Eraser
from app.ingest import StreamIngest
from app.learner import Learner
from app.lineup import Lineup
from app.metrics import METRICS
from app.nats_connection import NatsConnection
from app.offline import OfflineFeatureWriter
from app.periodic import every
from app.registry_store import RegistryStore
from app.retention import EVERY_S as RETENTION_EVERY_S
from app.retention import TipScoresRetention
from app.scoring import Scorer
from app.service_lock import ServiceLock, ServiceLockTaken
from app.settings import Settings, env_name
from app.start_errors import StartupError, shown_url
from app.stream_identity import forget_positions_of_another_stream
from app.thread_work import ThreadWork, named
from app.warm_up import restore, warm_up
from models.policy import make_policy
from streams import jetstream as jsx
from streams import pull
from streams.log_throttle import LogThrottle, counted, since_last_line
from streams.read_up_to import DECISIONS_READ_AHEAD_S, ReadUpTo
from streams.scrub import scrub
from streams.store import OnlineStore

log = logging.getLogger("tipstream")
T = TypeVar("T")
STOP_FLUSH_S = 5.0  # and this long for JetStream to acknowledge the decisions served; the rest are spooled
# How long the stop waits for the NATS server to answer a ping before draining the connection. Drained while the
# server hung (SIGSTOP, in a soak), the stop waited 20 s more after its last checkpoint, nothing left to lose, logging
# a drain timed out and a reconnect tried meanwhile: closed at once instead.
STOP_NATS_ANSWER_S = 2.0


# Checkpoint writes run in a worker thread; a short GIL switch interval keeps them from
# holding the event loop (ingest and the API) for the default 5 ms at a time.
GIL_SWITCH_INTERVAL_S = 0.0005
GC_YOUNG_THRESHOLD = 20_000  # objects; why in Service.start
EMBEDDED_NATS_CHECK_S = 0.5  # how often the embedded nats-server is checked for having exited
SERVICE_LOCK_CHECK_S = 10.0  # how often the database lock's connection is checked (PostgreSQL restarted?)
STREAM_LIMITS_CHECK_S = 0.5  # how often a start with smaller stream limits looks for every stream read to its end
STREAM_LIMITS_RETRY_MAX_S = 30.0  # and at most how long it waits after failing to set them (the database away)
# How long the stop waits, at each of its two waits, for database work begun in worker threads (`ThreadWork`):
# a statement held up that long (a row locked, the database away) is given up on.
STOP_THREAD_WORK_S = 15.0
# How long the stop waits for the database to answer the lock's check (a `SELECT 1`, milliseconds) before its last
# checkpoint. A server that hangs while its host's kernel still acknowledges (a stalled disk, a paused VM, a SIGSTOPped
# postmaster) is no error for libpq, which waits for ever (`db.NETWORK_BOUNDS` end only a silent link): the stop
# waited with it, with no line said, and so would the process's exit, joining the threads stuck in its statements.
STOP_DATABASE_ANSWER_S = 5.0
# A stop whose last checkpoint saves at least this many users says so first: after a catch-up, which changes them
# all, it is long (a million users took 101 s on SQLite here, 137 s on PostgreSQL), and nothing was said until it
# had ended.
STOP_CHECKPOINT_TOLD_USERS = 10_000


def resume_points(positions: dict[str, int]) -> str:
    """Where the learner reads each stream again from, said in words: the line printed Python's dict, and its
    DECISIONS 0 (no decision read before the snapshot) looked like a position lost.

    >>> resume_points({"FEEDBACK": 1656, "DECISIONS": 0})
    'FEEDBACK after 1,656, DECISIONS from its start'
    """
    return ", ".join(f"{stream} after {seq:,}" if seq else f"{stream} from its start" for stream, seq in positions.items())


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = OnlineStore()
        self.store.idle_days = settings.idle_user_days
        self.store.on_unreadable = lambda unreadable: self._fail(str(unreadable))
        self.engine = make_engine(settings.sqlalchemy_url)
        self.service_lock = ServiceLock(settings.sqlalchemy_url)
        self.threads = ThreadWork()  # the database work of its loops in worker threads, which the stop waits for
        # The stop's own work in a thread (the decision spool, the writer's and the embedded nats-server's ends): a
        # database that hangs holds threads of asyncio's default executor in statements, and the stop waited for one.
        self._stop_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tipstream-stop")
        self.embedded: EmbeddedNats | None = None
        self.nc: pull.IngestClient | None = None
        self.ingests: list[StreamIngest] = []
        self.checkpointer: Checkpointer | None = None
        self.eraser: Eraser | None = None
        self.checkpoint_writer: CheckpointWriter | None = None
        self.offline: OfflineFeatureWriter | None = None
        self.retention: TipScoresRetention | None = None
        self.freezer = FreezePolicy(settings.gc_freeze_every_users)
        self.nats_url = settings.nats_url or ""
        self._stopping = False
        self.database_hangs = False  # found so by the stop: what waits on the database is not waited for
        self._lock_retaking = False  # the database lock's session was lost and is not taken again yet
        self._database_not_ours: str | None = None  # why this service writes no more checkpoints (the lock let go of)
        # Called with a message when the service cannot go on and must be started again (`serve`
        # stops the server with exit code 1): the NATS connection closed for good.
        self.on_fatal: Callable[[str], None] | None = None
        self.fatal: str | None = None
        self.background = BackgroundTasks(fail=self._fail)
        self.nats_connection = NatsConnection(settings, on_reconnected=self._resume_streams,
                                              stopping=lambda: self._stopping, fail=self._fail)
        # Learning: the registry's models, the decision log, the learner, /score.
        self.lineup = Lineup(RegistryStore(self.engine), self.engine, eval_max_rewards=settings.card_eval_max_rewards,
                             silence_reward=settings.silence_reward, log_level=settings.log_level)
        self.decision_log = TipScoresLog()
        self.learner = Learner(
            self.lineup, self.store, self.decision_log, rewards=settings.rewards,
            cache_mb=settings.learner_join_cache_mb, window_s=settings.learner_join_window_s,
            pending_max=settings.learner_pending_max, pending_max_age_s=settings.learner_pending_max_age_s,
            snapshot_every_s=settings.model_snapshot_every_s, silence_reward=settings.silence_reward,
            silence_after_s=settings.silence_after_s, max_future_s=settings.max_future_s,
        )
        self.lineup.participants.append(self.learner)
        self.scorer = Scorer(self.store, self.lineup, make_policy(settings.policy, **settings.policy_params()),
                             random.Random(settings.policy_seed), feature_cache_users=settings.feature_cache_users)
        self.publisher = DecisionPublisher(
            lambda: self.nc, queue_max=settings.decision_queue_max, batch=settings.decision_batch,
            window=settings.decision_window, queue_max_bytes=settings.decision_queue_mb * 1024 * 1024,
            on_published=self.learner.published)
        self._publisher_task: asyncio.Task[None] | None = None
        self.decision_tail: OwnTail | None = None
        self._checkpointed: dict[str, int] = {}  # stream positions of the last checkpoint, as started
        self._restored: dict[str, int] = {}  # and as the database held them: the first checkpoint checks them
        self.decisions_read = ReadUpTo()  # how far the DECISIONS ingest has read since the start
        self.feedback_read = ReadUpTo()  # and FEEDBACK's: the learner's join window follows it

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.service_lock.acquire)
        except ServiceLockTaken as taken:
            raise StartupError(str(taken)) from None
        try:
            await self._start()
        except BaseException:  # a start that failed (or was cut short) lets the next one take the database
            if self.service_lock.needed:  # and writes nothing after: the stop that follows wrote a last checkpoint
                self._give_up_database("the start failed and let go of the database lock, which another service "
                                       "may hold by now (it would write over that service's state)")
            await self.service_lock.arelease()
            raise

    async def _start(self) -> None:
        s = self.settings
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        # Ingest allocates a few short-lived objects per event, freed by reference counting;
        # the default threshold (700) runs the cycle collector every ~150 events for nothing.
        # But a young collection stalls the loop for as long as it takes: at 100,000 objects,
        # 50 ms under ingest and 21-31 ms under /score load; at 20,000, 11 ms and ~5, for
        # 2-5% of ingest's time in the collector instead of ~3% (bench/ingest.py, timed with
        # gc.callbacks).
        gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)
        self.background.start(loop_lag.watch(METRICS.loop_lag.observe), name="event loop lag")
        release = await asyncio.to_thread(version.describe)  # git, once a process
        METRICS.build_info.labels(release.version, release.schema, release.commit or "").set(1)
        s.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # as `startup.hold_data_dir` makes it
        if self.service_lock.needed:
            self.background.start(every(SERVICE_LOCK_CHECK_S, self._keep_service_lock, "checking the database lock"),
                                  name="database lock")
        await asyncio.to_thread(migrate.upgrade, s.sqlalchemy_url)
        await asyncio.to_thread(refuse_read_only, self.engine)
        if await asyncio.to_thread(autovacuum_is_off, self.engine):
            log.warning("PostgreSQL's autovacuum is off (SHOW autovacuum): every checkpoint rewrites the state of each "
                        "user with new events, and the old rows are kept until a VACUUM (a database of 8 MB grew to "
                        "736 MB in 40 minutes of `--demo 100`). Turn it on (autovacuum = on), or run VACUUM on a "
                        "schedule.")
        if not s.nats_url:
            self.embedded = EmbeddedNats(s.data_dir / STORE_DIR)
            self.nats_url = await asyncio.to_thread(self.embedded.start)
            write_private(s.data_dir / URL_FILE, self.nats_url)  # it holds the server's token
            self.background.start(every(EMBEDDED_NATS_CHECK_S, self._keep_embedded_nats_up,
                                        "starting the embedded nats-server again"), name="embedded nats-server")
        self.nc = await self.nats_connection.connect(self.nats_url, self.embedded)
        js = self.nc.jetstream(timeout=s.nats_jetstream_timeout_s)
        await self.nats_connection.check_server(js)
        streams_lock = asyncio.Lock()  # every ingest that finds its stream gone asks at once: one creates them
        # A smaller TIPSTREAM_STREAM_MAX_BYTES or _MAX_AGE_DAYS set at once made JetStream drop the streams' oldest
        # messages before ingest read them: the events published while the service was stopped, lost to the fold.
        read_to_end = asyncio.Event()
        lower_held = False

        async def ensure_streams() -> None:
            nonlocal lower_held
            async with streams_lock:
                lower_held = await jsx.ensure_streams(
                    js, max_age_days=s.stream_max_age_days, max_bytes=s.stream_max_bytes,
                    duplicate_window_s=s.duplicate_window_s, dlq_max_age_days=s.dlq_max_age_days,
                    replicas=s.stream_replicas, lower_limits=read_to_end.is_set(),
                ) or lower_held

        self._ensure_streams = ensure_streams
        self._read_to_end = read_to_end
        # Before any consumer is re-created, which would take the running one's from under it, and before the
        # streams are set to this start's settings: a refused start's smaller TIPSTREAM_STREAM_MAX_BYTES or
        # _MAX_AGE_DAYS made JetStream drop the running service's oldest events.
        busy = await jsx.read_by_another(js, [spec.name for spec in (*jsx.INGESTED_STREAMS, jsx.DECISIONS)])
        if busy:
            raise StartupError(
                f"Another tipstream service reads {', '.join(busy)} from the NATS server at {shown_url(self.nats_url)} "
                f"(NATS_URL): a pull request waits on its consumer {jsx.durable_of(busy[0])}, or what it hands out moves "
                "on (a service catching up), or a NATS cluster node answers for it without its copy yet (one just "
                "made). Two would each read "
                "part of every stream and write over each other's state: stop the other first, or give each service "
                "a NATS server or account of its own.")
        if (short := short_duplicate_window(s.duplicate_window_s)) is not None:
            log.warning("%s", short)
        await self._ensure_streams()
        target = SqlCheckpointStore(self.engine)
        started = time.perf_counter()
        self._restored = await restore(self.store, self.freezer, target)
        self.background.start(warm_up(self.store, self.freezer, target, lambda: self.checkpointer), name="warm-up")
        # Counted before the learning loads: by then the warm-up may have loaded every user, and a
        # restart with all of them logged "no users yet".
        restored = len(self.store.cold)
        await self._load_learning()
        await forget_positions_of_another_stream(js, await asyncio.to_thread(target.position_times),
                                                 self._checkpointed, self.store, data_dir=s.data_dir,
                                                 embedded=self.embedded is not None)
        # The checkpoint's own positions: the streams' read positions are the learning's by now, where
        # it resumes (logged with the models), and DECISIONS read 0 after every start.
        log.info("checkpoint restored: %s, positions %s (%.2fs)",
                 f"{restored} users (loading in the background)" if restored else "no users yet",
                 self._checkpointed, time.perf_counter() - started)
        if s.checkpoint_in_process:
            self.checkpoint_writer = CheckpointWriter(s.sqlalchemy_url, s.log_level)
        self.checkpointer = Checkpointer(self.store, target, s.checkpoint_every_events, s.checkpoint_every_s,
                                         participants=[self.learner, self.decision_log], writer=self.checkpoint_writer,
                                         lock=self.lineup.snapshot_lock, committed=self._restored, threads=self.threads)
        self.checkpointer.on_lost = self._database_lost_commits
        self.checkpointer.stored_us = functools.partial(jsx.stored_us, js)
        self.eraser = Eraser(self.engine, self.store, self.learner, checkpoint=self.checkpointer.checkpoint,
                             lock=self.checkpointer.lock, ingests=self.ingests, js=js, scrub=scrub,
                             learning_versions=lambda: {version for version, _ in self.lineup.learning},
                             unpublished=self.publisher.unpublished, withdraw=self.publisher.withdraw,
                             let_go_held=self.publisher.let_go_held, threads=self.threads)
        self.checkpointer.participants.append(self.eraser)  # last: its deletes follow the other rows (write_erasures)
        await asyncio.to_thread(self.eraser.resume)  # before DECISIONS is read back
        self.checkpointer.refused = self._database_not_ours  # lost during the start already
        if self.service_lock.needed:
            # The lock's session ended (PostgreSQL restarted, the session terminated) is found by a check every
            # 10 s: until then the checkpoints went on without the lock, one taken meanwhile by another service too.
            self.checkpointer.before_write = self._keep_service_lock
        self.lineup.flush = self.checkpointer.checkpoint
        self.eraser.refused = self._database_not_ours
        if self.service_lock.needed:  # as the checkpoints' (above)
            self.lineup.before_write = self.eraser.before_write = self._keep_service_lock
        for spec in jsx.INGESTED_STREAMS:
            ingest = StreamIngest(
                self.nc, js, spec, self.store, self.checkpointer, batch=s.ingest_batch,
                max_event_bytes=s.max_event_bytes, max_uncheckpointed=s.max_uncheckpointed_events,
                max_future_s=s.max_future_s, dead_lettered_upto=self._checkpointed.get(spec.name, 0),
                ensure_streams=self._ensure_streams, store_failed=self._store_failed, **self._ingest_hooks(spec),
            )
            await ingest.start()
            self.ingests.append(ingest)
            self.background.start(ingest.run(), name=f"ingest {spec.name}")
        await self._start_decision_log(js)
        if lower_held:
            self.background.start(self._lower_stream_limits_once_read(read_to_end), name="stream limits")
        # Users folded from the streams (a first start, new users) are frozen as the store grows.
        self.checkpointer.on_saved.append(lambda _: self.freezer.check(self.store.taken_in))
        self.background.start(self.checkpointer.run(), name="checkpointer")
        if s.offline_features_every_s:
            self.offline = OfflineFeatureWriter(self.store, self.engine, s.offline_features_every_s, threads=self.threads)
            self.offline.refused = self._database_not_ours
            if self.service_lock.needed:  # as the checkpoints' (`before_write` above)
                self.offline.before_write = self._keep_service_lock
            self.checkpointer.on_saved.append(self.offline.saved)
            self.checkpointer.keep_awake.append(self.offline.holds)
            self.background.start(self.offline.find_behind(), name="offline features behind")
            self.background.start(self.offline.run(), name="offline features")
        if self.offline is not None:
            self.eraser.offline = self.offline
        self.background.start(self.eraser.run(), name="erasures")
        if s.tip_scores_max_age_days:
            self.retention = retention = TipScoresRetention(self.engine, s.tip_scores_max_age_days,
                                                            threads=self.threads)
            retention.refused = self._database_not_ours
            if self.service_lock.needed:  # as the checkpoints' (`before_write` above)
                retention.before_write = self._keep_service_lock
            self.background.start(every(RETENTION_EVERY_S, retention.prune, "deleting old tip_scores rows"),
                                  name="tip_scores retention")

    async def _lower_stream_limits_once_read(self, read_to_end: asyncio.Event,
                                             clock: Callable[[], float] = time.monotonic) -> None:
        """Set the streams' smaller limits, held at the start, once every ingest has read its stream up to the last
        message it held when this began (what was published while the service was stopped, and more), and a
        committed checkpoint (with the learner's snapshot) holds it: what JetStream then drops, a start after a
        crash would not have to read again. Not "read to its end at one look": with events coming all the time, some
        stream always had one on its way, and the limits were never set. A stream read again from its first
        message meanwhile (made anew, an older copy of its store) is waited for up to its own last message then."""
        assert self.checkpointer is not None
        wait_s = STREAM_LIMITS_CHECK_S
        needed: dict[str, tuple[int, int]] = {}  # stream -> (its ingest's `renewals` then, the sequence to read past)
        # The database away wrote a line per try, 30 s apart at the backoff's most, for as long as it was away: told
        # at once, then once a minute with the tries since, another kind of failure at once.
        lines, failures = LogThrottle(clock=clock), 0
        while True:
            await asyncio.sleep(wait_s)
            try:
                if not await self._read_past(needed):
                    continue
                self.learner.snapshot_at_next_checkpoint()
                await self.checkpointer.checkpoint()
                if self.checkpointer.refused is not None:
                    # No checkpoint from now on (the database lost commits): what JetStream would drop, a start
                    # reads again from what the database holds.
                    log.warning("the streams' smaller limits stay unset: %s", self.checkpointer.refused)
                    return
                if any(ingest.renewals != needed[ingest.spec.name][0]
                       or self.checkpointer.committed.get(ingest.spec.name, 0) < needed[ingest.spec.name][1]
                       for ingest in self.ingests):
                    continue  # a stream read again meanwhile (its position went back): not all of it committed
                read_to_end.set()
                await self._ensure_streams()
                if failures:
                    log.info("the streams' smaller limits are set, after %s that failed", counted(failures, "try", "tries"))
                return
            except Exception as error:  # noqa: BLE001 - the database or NATS away: tried again, less often
                wait_s, failures = min(wait_s * 2, STREAM_LIMITS_RETRY_MAX_S), failures + 1
                left_out = lines.allow(type(error))
                if left_out is not None:
                    log.warning("cannot set the streams' smaller limits yet (%s); trying again in %g s%s",
                                one_line(error), wait_s,
                                since_last_line(left_out, "failed try", "failed tries"))

    async def _read_past(self, needed: dict[str, tuple[int, int]]) -> bool:
        """Whether every ingest has read past the sequence `needed` holds for its stream: the stream's last one when
        first asked, or when it was last read again from its first message (its `renewals` moved). One found read
        to its end (`_read_to_end_now`) needs no more than its position then: the messages up to its last may
        have gone (erased, or a sequence JetStream gave to none)."""
        for ingest in self.ingests:
            name = ingest.spec.name
            if (taken := needed.get(name)) is None or taken[0] != ingest.renewals:
                renewals = ingest.renewals  # before asking: a renewal meanwhile is seen at the next look
                needed[name] = taken = (renewals, (await ingest.js.stream_info(name)).state.last_seq)
            position = self.store.positions.get(name, 0)
            if position < taken[1] and self._read_to_end_now(ingest):
                needed[name] = taken = (taken[0], position)
        return all(self.store.positions.get(name, 0) >= seq for name, (_, seq) in needed.items())

    def _read_to_end_now(self, ingest: StreamIngest) -> bool:
        """Whether `ingest` has read its stream to its end now. DECISIONS' ingest stops reading while its tail follows
        this process's decisions."""
        tail = self.decision_tail
        return ingest.drained() or (tail is not None and tail.ingest is ingest and tail.following)

    async def _load_learning(self) -> None:
        """The registry and models (the first start registers `v1`), then the learner's snapshot:
        FEEDBACK and DECISIONS resume from the positions it reflects, so learning resumes there."""
        s = self.settings
        await asyncio.to_thread(lambda: self.lineup.load(s.model_kind, s.bootstrap_shadow_kind, **s.model_params()))
        for name, wanted, registered in self.lineup.first_start_unused:
            field = {"kind": "model_kind", "shadow_kind": "bootstrap_shadow_kind"}.get(name, f"model_{name}")
            if field not in s.model_fields_set:  # a default that differs from v1's: nobody asked for it now
                continue
            if name == "shadow_kind":
                found = "no v2 was registered" if registered is None else f"v2 was registered as {registered}"
            else:
                found = f"v1 was registered with {name} {registered}"
            option = f"--kind {wanted}" if name in ("kind", "shadow_kind") else f"--param {name}={wanted}"
            log.warning("%s=%s is read on the first start only and %s: it changes nothing now. To use it, register "
                        "a version (`tipstream models register <name> %s`), then %s.", env_name(field),
                        getattr(s, field), found, option, "shadow it" if name == "shadow_kind" else "shadow and promote it")
        resume = await asyncio.to_thread(self.learner.restore, self.engine)
        self._checkpointed = dict(self.store.positions)  # read to here before: see DeadLettering.dead_lettered
        for stream, seq in (resume or {}).items():
            if seq or stream in self.store.positions:  # a stream never read stays without a position
                self.store.positions[stream] = min(seq, self.store.positions.get(stream, seq))
        log.info("models: champion %s, shadow %s; %s", self.lineup.champion_version, self.lineup.shadow_version or "-",
                 "no learner state saved yet: learning reads on from ingest's positions" if resume is None
                 else f"learning resumes reading {resume_points(resume)}")

    def _store_failed(self, stream: str) -> str | None:
        """What says NATS failed to store a message of `stream` (`jsx.gone_before`): the embedded nats-server's log or
        full store; else decisions left unanswered while connected (the one sign with NATS_URL, whose log is not ours
        to read)."""
        if self.embedded is not None and (told := self.embedded.store_failed(stream)):
            return told
        return self.publisher.store_failed_told()

    def _ingest_hooks(self, spec: jsx.StreamSpec) -> dict[str, Any]:
        # The learner sees every feedback event, also those the fold already holds (see Learner.feedback_sink).
        # With each message's ack subject: the learner stamps a reward with when it was stored.
        if spec is not jsx.FEEDBACK:
            return {}
        # FEEDBACK's progress: the learner judges its join window in FEEDBACK's time while it is behind.
        self.learner.feedback_read = self.feedback_read
        self.feedback_read.on_caught_up = self.learner.feedback_caught_up
        # Until DECISIONS has been read back (the learner's join cache: its whole window at a restart,
        # all of it in a rebuild from the log), FEEDBACK follows it: live, a decision is known before
        # its feedback comes, and rewards are learned in FEEDBACK's order. Read first, every reward
        # waited for its decision, was learned in DECISIONS' order instead, and past
        # TIPSTREAM_LEARNER_PENDING_MAX waiting (the feedback of an outage) was never learned at all.
        return {"sink": self.learner.feedback_sink(), "sink_reply": True, "read": self.feedback_read,
                "after": self.decisions_read,
                # Further than each reaction: a decision of ours stored just after it is held when it is read.
                "after_ahead_ms": int(DECISIONS_READ_AHEAD_S * 1000),
                # Off (the default), no call per message at all.
                "before": self.learner.silences.before_message if self.learner.silences is not None else None}

    async def _hold_spool_reserve(self) -> None:
        data_dir, size = self.settings.data_dir, round(self.settings.spool_reserve_mb * (1 << 20))
        if not size:  # none wanted: one an earlier start held is disk given back
            (data_dir / decision_spool.RESERVE_NAME).unlink(missing_ok=True)
        elif not await asyncio.to_thread(decision_spool.hold_reserve, data_dir, size):
            log.warning("no room in %s for the %s MB kept for the decisions waiting at a stop "
                        "(TIPSTREAM_SPOOL_RESERVE_MB): with its disk full then, they are lost. Free space on it; it "
                        "is taken once there is room.", data_dir, f"{self.settings.spool_reserve_mb:g}")
            self.background.start(decision_spool.hold_reserve_once_room(data_dir, size=size), name="spool reserve")

    async def _start_decision_log(self, js: Any) -> None:
        """Read DECISIONS back into the learner (join cache, tip_scores rows) until caught up, then only
        what others publish; start publishing decisions."""
        assert self.nc is not None and self.checkpointer is not None and self.eraser is not None
        s = self.settings
        spool = self.settings.data_dir / decision_spool.SPOOL_NAME
        spooled = await asyncio.to_thread(decision_spool.read_at_start, spool)
        await self._hold_spool_reserve()
        # Before DECISIONS is read: the spooled ones must be held before a copy that landed is read back.
        if spooled and len(kept := await asyncio.to_thread(self.eraser.without_forgotten, spooled)) < len(spooled):
            log.info("%d decisions served before the last stop were for users forgotten since: not published",
                     len(spooled) - len(kept))
            error = await asyncio.to_thread(decision_spool.rewrite, spool, kept)  # nor kept on disk
            if error is not None:
                log.warning("the %d decisions of users forgotten since could not be taken out of %s (%s): not "
                            "published, they go with it once JetStream has the others", len(spooled) - len(kept),
                            spool, error.strerror or error)
            spooled = kept
        ingest = StreamIngest(
            self.nc, js, jsx.DECISIONS, self.store, self.checkpointer, batch=s.ingest_batch,
            max_event_bytes=max(s.max_event_bytes, s.score_max_body_bytes * 4),
            max_uncheckpointed=s.max_uncheckpointed_events, decode=decode_decision, sink=self.learner.add_logged,
            sink_reply=True,
            dead_lettered_upto=self._checkpointed.get(jsx.DECISIONS.name, 0), read=self.decisions_read,
            # Each decision read back adds a tip_scores row that waits for a checkpoint: bounded as
            # /score's own are (it answers 503 there), else another publisher's decisions, or a
            # rebuild's read-back, piled up in memory for as long as the database was away.
            backlog=lambda: self.decision_log.backlog, max_backlog=s.max_unwritten_decisions, folds=False,
            ensure_streams=self._ensure_streams,
            # Read back no further ahead of FEEDBACK than the learner's join cache holds: the decisions it let go of
            # to make room would be those whose feedback is still to be read.
            room=self.learner.room_for, followed_by=self.feedback_read, store_failed=self._store_failed,
        )
        # What the checkpoint read of DECISIONS has its rows already: read back, they are not marked again.
        self.learner.rows_written_upto = self._checkpointed.get(jsx.DECISIONS.name, 0)
        await ingest.start()
        self.ingests.append(ingest)
        self.background.start(ingest.run(), name="ingest DECISIONS")

        async def last_seq() -> int:
            return (await js.stream_info(jsx.DECISIONS.name)).state.last_seq

        if s.policy_seed is not None:
            # Seeded alone, every start drew the numbers the last one did: the first answers after
            # each restart explored alike. The decisions logged so far set starts apart, and a start
            # on the same log draws the same.
            self.scorer.rng.seed(f"{s.policy_seed}:{await last_seq()}")

        # Once caught up, this process's own decisions are not read back (see decision_tail.py).
        self.decision_tail = OwnTail(ingest, self.store, last_seq, on_follow=self.learner.caught_up,
                                     stream_next_seq=functools.partial(jsx.next_stored, js, jsx.DECISIONS))
        self.publisher.on_stored = self.decision_tail.stored
        self.background.start(self.decision_tail.run(), name="decisions tail")
        await self.publisher.start()
        if spooled:
            for _, decision_id, payload in spooled:  # joinable with their feedback, as when they were served
                self.learner.served(decision_id, payload, orjson.loads(payload), spooled=True)
            self.publisher.put_back(spooled, on_all_published=lambda: spool.unlink(missing_ok=True))
            log.info("publishing %d decisions served before the last stop first", len(spooled))
        self._publisher_task = self.background.start(self.publisher.run(), name="decision publisher")

    @property
    def warm(self) -> bool:
        return not self.store.cold

    @property
    def ready(self) -> bool:
        return bool(self.ingests) and all(i.current for i in self.ingests) and bool(self.nc and self.nc.is_connected)

    async def stop(self) -> None:
        """Once: a stop called again returns (`serve` stops the service whichever way uvicorn ended, and
        uvicorn's lifespan may have stopped it already)."""
        if self._stopping:
            return
        self._stopping = True
        # Decisions already served go to the log before anything else stops.
        spool, spooled = self.settings.data_dir / decision_spool.SPOOL_NAME, []
        if self._publisher_task is not None:
            await self.publisher.flush(timeout_s=STOP_FLUSH_S)
            # Cancelled again if it goes on, as the other loops: cancelled and waited for once, a cancellation nats-py
            # swallowed under it (`DecisionPublisher._run`) held the stop for ever.
            await self.background.end([self._publisher_task])
            # Taken whether or not the flush emptied the queue: left open, it took the decision of a /score a second
            # Ctrl-C did not wait for, with nothing left to publish it, and the answer was served all the same.
            left = self.publisher.hand_over()
            if left:
                # In a thread: 50,000 decisions of 2 KB (NATS away) are 114 MB written and synced, 0.5 s here, seconds
                # on a slow disk, with the loop held meanwhile, /score still answering (a second Ctrl-C does not wait
                # for it) and /healthz. Awaited before the ingests stop: an acknowledgement that comes meanwhile
                # finds the put-back decisions' spool handed over already (`hand_over`), and is
                # `drop_acknowledged`'s once the connection is drained.
                spooled = await self._in_stop_thread(decision_spool.keep_at_stop, spool, left,
                                                     self.publisher.why_waiting())
        catching_up = [ingest.spec.name for ingest in self.ingests if not ingest.current]
        for ingest in self.ingests:
            await ingest.stop()
        await self.background.cancel()
        # Before the last checkpoint: a cancelled checkpoint's transaction, committing after it, would set the
        # positions back; a cancelled pass's rows would go over the last pass's.
        await self._thread_work_ended()
        if self.checkpointer and self.checkpointer.refused is not None:
            log.warning("no last checkpoint: %s; what was read since the last checkpoint stays in the streams",
                        self.checkpointer.refused)
        elif self.checkpointer and not await self._database_answers():
            self.database_hangs = True
            log.warning("stopping: no last checkpoint: the database answered nothing within %g s (a server that "
                        "hangs, its host still acknowledging: a stalled disk, a paused VM, a stopped postmaster); "
                        "nothing is lost: the %s read since the last checkpoint (%s) stay in the streams, and the "
                        "next start reads them again from there", STOP_DATABASE_ANSWER_S,
                        counted(self.checkpointer.uncheckpointed, "event", "events"),
                        resume_points(self._committed_positions()))
        elif self.checkpointer:
            self.learner.snapshot_at_next_checkpoint()
            began = time.perf_counter()
            if (changed := self.store.dirty_count) >= STOP_CHECKPOINT_TOLD_USERS:
                log.info("stopping: writing a last checkpoint of the %s users changed since the previous one (a "
                         "catch-up changes them all: a million take a minute or two)", f"{changed:,}")
            try:
                await self.checkpointer.checkpoint()
            except Exception as error:  # noqa: BLE001
                setting = refused_by_setting(error, self.engine.url.username)
                told = briefly(error, self.engine.url)  # not SQLAlchemy's statement, over lines of its own
                log.warning("last checkpoint failed (%s); the next start replays from the previous one",
                            told if setting is None else f"{told}: {setting}")
            else:
                log.info("stopping: last checkpoint written in %.1f s", time.perf_counter() - began)
                if catching_up and self.offline is not None and self.offline.pending:
                    # Rows of a state the rest of the catch-up changes again: the stop waited up to offline.LAST_PASS_S
                    # for them, and the next start, which finds them behind (`users_behind`), writes them anyway.
                    log.info("stopping during the catch-up of %s: the user_features rows of %d users are left to "
                             "the next start", ", ".join(catching_up), len(self.offline.pending))
                elif self.offline is not None:
                    await self.offline.last_pass()
        if self.checkpoint_writer:
            # Its process, stuck in a statement, ends with this one (PR_SET_PDEATHSIG): not waited for.
            await self._in_stop_thread(functools.partial(self.checkpoint_writer.close, wait=not self.database_hangs))
        if self.nc:
            answers = await self._nats_answers()
            try:
                await self.nc.drain() if answers else await self.nc.close()
            except Exception as error:  # noqa: BLE001 - the server may be gone already; nothing is lost
                # Away, its closing fails on the dead socket, told as nats-py's words about a TCPTransport: the lines
                # of the disconnection and of `_nats_answers` have said it all.
                if answers:
                    log.info("NATS connection closed uncleanly (%s)", error)
        if spooled:  # no acknowledgement comes after the drain
            await self._in_stop_thread(decision_spool.drop_acknowledged, spool, spooled, self.publisher.unpublished())
        if self.embedded:
            await self._in_stop_thread(self.embedded.stop)
            (self.settings.data_dir / URL_FILE).unlink(missing_ok=True)
        if self.database_hangs:
            # Not let go of: its session's check waits on the database, and the release, on the lock's thread after
            # it, would wait with it. The lock goes with its session as the process ends (`startup.serve`), without
            # the threads stuck in statements; their sessions end with it, their transactions rolled back.
            self.engine.dispose()
            return
        await self._thread_work_ended()  # a batch of the last user_features pass its bound cut short
        self.engine.dispose()
        await self.service_lock.arelease()  # last: nothing of this service writes after it

    async def _in_stop_thread(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._stop_thread, function, *args)

    async def _database_answers(self) -> bool:
        """Whether the database answers the lock's check within STOP_DATABASE_ANSWER_S (an outage that refuses
        connections answers, with its error: the last checkpoint is tried, and fails, as before)."""
        if not self.service_lock.needed:  # SQLite: no server to hang
            return True
        check = asyncio.ensure_future(self._keep_service_lock())
        done, _ = await asyncio.wait({check}, timeout=STOP_DATABASE_ANSWER_S)
        if not done:
            check.cancel()  # its thread stays stuck in the statement
        return bool(done)

    def _committed_positions(self) -> dict[str, int]:
        return {name: self.checkpointer.committed.get(name, 0) for name in self.store.positions}

    async def _nats_answers(self) -> bool:
        """Whether the NATS connection is up and its server answers a ping within STOP_NATS_ANSWER_S (told if not)."""
        if not self.nc.is_connected:
            log.info("stopping: NATS is away (the service was reconnecting); the connection is closed")
            return False
        try:
            await self.nc.flush(timeout=STOP_NATS_ANSWER_S)
        except Exception as error:  # noqa: BLE001 - a server that hangs, or the connection lost meanwhile
            log.info("stopping: the NATS server answered no ping within %g s (%s: it hangs?); the connection is "
                     "closed without draining it, which would wait for that server", STOP_NATS_ANSWER_S,
                     type(error).__name__)
            return False
        return True

    async def _thread_work_ended(self) -> None:
        """Wait for the database work the stop's cancellations left running in worker threads (the task that
        awaited it cancelled, the thread goes on), STOP_THREAD_WORK_S at most. Not waited for, a user_features
        write held up by a locked row committed after the stop had let go of the database lock, over the rows
        of a service started on the database since."""
        left = await self.threads.ended(STOP_THREAD_WORK_S)
        if left:
            log.warning("stopping: %s still running in worker threads after %g s (the database slow, or a row "
                        "locked): not waited for longer; it may commit after this service has let go of the "
                        "database", named(left), STOP_THREAD_WORK_S)

    def _give_up_database(self, why: str) -> None:
        """No checkpoint or user_features row from now on, nor a last one at the stop: the database may be
        another service's, or have lost commits of this one's."""
        self._database_not_ours = why
        if self.checkpointer is not None:  # else the one the start makes takes it (`_start`)
            self.checkpointer.refused = why
        if self.offline is not None:
            self.offline.refused = why
        if self.retention is not None:
            self.retention.refused = why
        self.lineup.refused = why
        if self.eraser is not None:
            self.eraser.refused = why

    async def _keep_service_lock(self) -> None:
        try:
            await self.service_lock.akeep()  # one check at a time, on the lock's own thread, whoever asks
        except ServiceLockTaken as taken:
            self._give_up_database("another service took the database lock (it would write over that service's "
                                   "state)")
            self._fail(f"This service's database lock's session ended (PostgreSQL restarted or away, or the session "
                       f"terminated): it lost its database lock, and another service took it: {taken} This one stops "
                       f"(exit code 1).")
        except Exception as error:  # noqa: BLE001 - the database away: tried again at the next check
            # Said once an outage, not every check: a multi-line driver error every 10 s for as long as it lasted.
            if not self._lock_retaking:
                log.warning("cannot take this service's database lock again yet (%s); trying every %g s until "
                            "PostgreSQL answers", briefly(error, self.settings.sqlalchemy_url), SERVICE_LOCK_CHECK_S)
            self._lock_retaking = True
        else:
            self._lock_retaking = False

    def _database_lost_commits(self, message: str) -> None:
        """A checkpoint found older positions in the database than this service committed
        (`PositionsBehind`): nothing more is written from memory, which holds what the database lost,
        and the service stops for a start that resumes from what the database holds."""
        self._give_up_database("the database lost checkpoints this service had committed (a start replays from "
                               "what it holds)")
        self._fail(message)

    async def _keep_embedded_nats_up(self) -> None:
        # The connection reconnects on its own once the server is back at the same URL.
        if self.embedded is not None and not self._stopping:
            await asyncio.to_thread(self.embedded.restart_if_exited)
            await asyncio.to_thread(self.embedded.check_store)

    def _resume_streams(self) -> None:
        """NATS reconnected: each ingest resumes from its own position, and the decisions sent on the old
        connection and not acknowledged are sent again at once."""
        self.publisher.reconnected()
        for ingest in self.ingests:
            ingest.request_reset()

    def _fail(self, why: str) -> None:
        """The service cannot go on: say why, and have `serve` stop it with exit code 1."""
        if self._stopping or self.fatal is not None:
            return
        self.fatal = why
        log.error("%s", self.fatal)
        if self.on_fatal is not None:
            self.on_fatal(self.fatal)
