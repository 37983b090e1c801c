"""Composition root: settings -> database -> NATS -> streams -> checkpoint -> ingest -> API.

Start-up steps, in order:
1. Apply migrations (alembic upgrade head).
2. Start the embedded nats-server if NATS_URL is unset; connect.
3. Create or update the streams.
4. Load the latest checkpoint into the online store.
5. Re-create each durable consumer at its checkpointed position + 1 and start ingest.
6. Start the checkpointer. Shutdown runs the steps backwards and writes a last checkpoint.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from typing import Any


from app import migrate
from app.checkpoints import Checkpointer, SqlCheckpointStore
from app.db import make_engine
from app.embedded_nats import EmbeddedNats
from app.ingest import StreamIngest
from app.metrics import METRICS
from app.offline import OfflineFeatureWriter
from app.settings import Settings
from streams import jetstream as jsx
from streams.store import OnlineStore

log = logging.getLogger("tipstream")


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = OnlineStore()
        self.engine = make_engine(settings.sqlalchemy_url)
        self.embedded: EmbeddedNats | None = None
        self.nc: jsx.IngestClient | None = None
        self.ingests: list[StreamIngest] = []
        self.checkpointer: Checkpointer | None = None
        self.offline: OfflineFeatureWriter | None = None
        self.nats_url = settings.nats_url or ""
        self._tasks: list[asyncio.Task[Any]] = []
        self.started_at = time.time()

    async def start(self) -> None:
        s = self.settings
        # Checkpoint writes run in a worker thread; a short GIL switch interval keeps them
        # from holding the event loop (ingest and the API) for the default 5 ms at a time.
        sys.setswitchinterval(0.0005)
        s.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(migrate.upgrade, s.sqlalchemy_url)
        if not s.nats_url:
            self.embedded = EmbeddedNats(s.data_dir / "nats")
            self.nats_url = await asyncio.to_thread(self.embedded.start)
            (s.data_dir / "nats.url").write_text(self.nats_url)
        self.nc = await jsx.connect(
            self.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            reconnected_cb=self._on_reconnected, disconnected_cb=self._on_disconnected,
            error_cb=self._on_error, name="tipstream",
        )
        js = self.nc.jetstream(timeout=10)
        await jsx.ensure_streams(
            js, max_age_days=s.stream_max_age_days, max_bytes=s.stream_max_bytes,
            duplicate_window_s=s.duplicate_window_s, dlq_max_age_days=s.dlq_max_age_days,
        )
        target = SqlCheckpointStore(self.engine)
        started = time.perf_counter()
        await self._restore(target)
        log.info("checkpoint restored: %d users (loading in the background), positions %s (%.2fs)",
                 len(self.store.cold), self.store.positions, time.perf_counter() - started)
        self.checkpointer = Checkpointer(self.store, target, s.checkpoint_every_events, s.checkpoint_every_s)
        for spec in jsx.INGESTED_STREAMS:
            ingest = StreamIngest(
                self.nc, js, spec, self.store, self.checkpointer, batch=s.ingest_batch,
                max_event_bytes=s.max_event_bytes, max_uncheckpointed=s.max_uncheckpointed_events,
            )
            await ingest.start()
            self.ingests.append(ingest)
            self._tasks.append(asyncio.create_task(ingest.run(), name=f"ingest {spec.name}"))
        self._tasks.append(asyncio.create_task(self.checkpointer.run(), name="checkpointer"))
        if s.offline_features_every_s:
            self.offline = OfflineFeatureWriter(self.store, self.engine, s.offline_features_every_s)
            self.checkpointer.on_saved.append(self.offline.saved)
            self._tasks.append(asyncio.create_task(self.offline.run(), name="offline features"))

    async def _restore(self, target: SqlCheckpointStore) -> None:
        """Lazy restore: positions and user ids now, states on first use or by the warm-up task.

        A restart serves and ingests at once, however many users the checkpoint holds.
        """
        positions, _ = await asyncio.to_thread(target.load)
        self.store.positions = positions
        self.store.cold = set(await asyncio.to_thread(target.user_ids))
        self.store.fetch_cold = target.fetch
        self._tasks.append(asyncio.create_task(self._warm_up(target), name="warm-up"))

    async def _warm_up(self, target: SqlCheckpointStore) -> None:
        """Load every cold user, reading in a worker thread and folding in small chunks here."""
        if not self.store.cold:
            return
        loop, queue = asyncio.get_running_loop(), asyncio.Queue[list[tuple[str, bytes]]](maxsize=4)
        started = time.perf_counter()

        def read() -> None:
            chunk: list[tuple[str, bytes]] = []
            for row in target.states():
                chunk.append(row)
                if len(chunk) == 1_000:
                    asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()
                    chunk = []
            asyncio.run_coroutine_threadsafe(queue.put(chunk), loop).result()
            asyncio.run_coroutine_threadsafe(queue.put([]), loop).result()

        reader = asyncio.create_task(asyncio.to_thread(read))
        while chunk := await queue.get():
            for start in range(0, len(chunk), 100):
                self.store.warm(chunk[start : start + 100])
                await asyncio.sleep(0)
        await reader
        # Millions of long-lived state objects: keep the collector from rescanning them.
        gc.collect()
        gc.freeze()
        METRICS.users.set(len(self.store.users))
        log.info("all %d users loaded in %.1fs", len(self.store.users), time.perf_counter() - started)

    @property
    def warm(self) -> bool:
        return not self.store.cold

    @property
    def ready(self) -> bool:
        return bool(self.ingests) and all(i.caught_up for i in self.ingests) and bool(self.nc and self.nc.is_connected)

    async def stop(self) -> None:
        for ingest in self.ingests:
            await ingest.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.checkpointer:
            try:
                await self.checkpointer.checkpoint()
            except Exception as error:  # noqa: BLE001
                log.warning("last checkpoint failed (%s); the next start replays from the previous one", error)
        if self.nc:
            await self.nc.drain() if self.nc.is_connected else await self.nc.close()
        if self.embedded:
            await self.embedded.astop()
        self.engine.dispose()

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS; resuming each stream from its own position")
        for ingest in self.ingests:
            ingest.request_reset()

    async def _on_disconnected(self) -> None:
        log.warning("disconnected from NATS; reconnecting")

    async def _on_error(self, error: Exception) -> None:
        log.warning("NATS: %s", error)
