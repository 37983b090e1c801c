"""Prometheus metrics, one registry per process (tests build their own services on it)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, disable_created_metrics

from streams.events import REJECTION_KINDS

# The *_created series double the output and say nothing an operator needs.
disable_created_metrics()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ingested = Counter(
            "tipstream_events_applied_total", "Events folded into state; for DECISIONS, decisions read back into the "
            "learner's join cache: another publisher's, and this service's own only as DECISIONS is read again (the "
            "catch-up after a start or a reconnect). Caught up, its own are not read back (the learner holds them from "
            "/score): they count in "
            'tipstream_decisions_total{outcome="published"}, and DECISIONS\' tipstream_stream_position follows their '
            "acknowledgements.", ["stream"], registry=r)
        self.ignored = Counter(
            "tipstream_events_ignored_total", "Duplicates and events older than every window (for DECISIONS, "
            "redeliveries and decisions older than the join window).", ["stream"], registry=r
        )
        self.dlq = Counter(
            "tipstream_dlq_total", "Events sent to the DLQ, by stream and reason (their Tipstream-Dlq-Kind header): "
            f"{', '.join(REJECTION_KINDS)}; each at 0 from its stream's start.", ["stream", "reason"], registry=r)
        self.build_info = Gauge(
            "tipstream_build_info", "1, labelled with the release that runs (`tipstream --version`): its package "
            "version, database schema and commit (empty outside a git checkout).", ["version", "schema", "commit"],
            registry=r)
        self.lag = Gauge("tipstream_stream_lag", "Messages in the stream not yet consumed.", ["stream"], registry=r)
        self.position = Gauge("tipstream_stream_position", "Last stream sequence applied.", ["stream"], registry=r)
        self.checkpoint_position = Gauge(
            "tipstream_checkpoint_position", "Stream sequence covered by the last checkpoint.", ["stream"], registry=r
        )
        self.checkpoint_seconds = Histogram(
            "tipstream_checkpoint_seconds", "Time to write one checkpoint.", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.checkpoint_users = Counter("tipstream_checkpoint_users_total", "User states written.", registry=r)
        self.erasures_unfinished = Gauge(
            "tipstream_erasures_unfinished", "Requests to forget a user not done yet (POST /admin/users/{id}/forget): "
            "their messages in the streams still to delete, or the service unable to (its log says why).", registry=r)
        self.users_at_cap = Gauge(
            "tipstream_users_at_event_cap", "Users holding the most events of one kind a user's state keeps "
            "(streams.fold.MAX_RECORDS_PER_KIND in 31 days), as last checkpointed, while those are within 31 days of "
            "the newest event folded (some window reaches them): their oldest of that kind are "
            "dropped, and features reading before what is kept are fallbacks. Above 0: a publisher in a loop?",
            registry=r)
        self.checkpoint_failures = Counter("tipstream_checkpoint_failures_total", "Failed checkpoint writes.", registry=r)
        self.checkpoint_ok_at = Gauge(
            "tipstream_checkpoint_ok_timestamp_seconds", "Unix time of the last checkpoint written or found "
            "with nothing to write (the start's, until the first one); alert on its age (time() - it): events folded since are replayed by a restart, "
            "and /score answers 503 once TIPSTREAM_MAX_UNWRITTEN_DECISIONS wait for one.", registry=r,
        )
        self.fold_delay = Histogram(
            "tipstream_fold_delay_seconds", "Seconds from JetStream storing an event to its fold into the user's state, "
            "for the oldest event of each batch folded once the stream has caught up (a start's read-back, and a "
            "stream's replay from its first message, are left out), by this host's clock against the NATS server's.", ["stream"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.loop_lag = Histogram(
            "tipstream_event_loop_lag_seconds", "How late the event loop woke a timer due every "
            "0.25 s: the time something held the loop without yielding (every request and stream waited meanwhile).",
            registry=r, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
        )
        self.user_reads = Histogram(
            "tipstream_user_read_seconds", "Reads of a user's state from the checkpoint (cold after a start, or let go "
            "of while idle) for an event or a request, from asking to having it (or giving up after 10 s), in "
            "worker threads: what such an event or request waited.", registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10),
        )
        self.users = Gauge("tipstream_users", "Users held in the online store.", registry=r)
        self.users_dormant = Gauge(
            "tipstream_users_dormant", "Idle users (no event for TIPSTREAM_IDLE_USER_DAYS of the log's time) let go of from memory: "
            "in the database only, loaded back by their next event or request.", registry=r,
        )
        self.offline_pending = Gauge(
            "tipstream_offline_pending_users", "Users whose user_features row awaits a pass.", registry=r
        )
        # Resident memory, CPU and open files, read from /proc when scraped (nothing on the hot path).
        ProcessCollector(registry=r)


METRICS = Metrics()
