"""The loop metrics expose exactly what prometheus_client's own Counter and Histogram would."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from app.loop_metrics import LoopCounter, LoopHistogram

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)


def exposition(registry: CollectorRegistry) -> str:
    # prometheus_client's own metrics also expose a *_created series, which says nothing here.
    return "".join(line + "\n" for line in generate_latest(registry).decode().splitlines() if "_created" not in line)


def test_counter_exposes_what_prometheus_client_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopCounter("t_answers_total", "Answers, by status.", ["status"], registry=ours)
    reference = Counter("t_answers_total", "Answers, by status.", ["status"], registry=theirs)
    rng = random.Random(7)
    for _ in range(500):
        status, amount = rng.choice(("200", "422", "503")), rng.choice((1, 1, 2.5))
        loop.labels(status).inc(amount)
        reference.labels(status).inc(amount)
    loop.labels(status="201").inc()
    reference.labels(status="201").inc()
    assert exposition(ours) == exposition(theirs)

    plain = LoopCounter("t_plain_total", "No labels.", registry=ours)
    plain_reference = Counter("t_plain_total", "No labels.", registry=theirs)
    plain.inc(3)
    plain_reference.inc(3)
    assert exposition(ours) == exposition(theirs) and plain.value == 3.0


def test_histogram_exposes_what_prometheus_client_does() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopHistogram("t_seconds", "Time.", buckets=BUCKETS, registry=ours)
    reference = Histogram("t_seconds", "Time.", buckets=BUCKETS, registry=theirs)
    rng = random.Random(11)
    # Values on a bound belong to it (le = "less or equal"); beyond the last, only to +Inf.
    values = [*BUCKETS, 0.0, 0.07, *(rng.expovariate(1 / 0.001) for _ in range(2_000))]
    for value in values:
        loop.observe(value)
        reference.observe(value)
    assert loop.count == len(values)
    assert exposition(ours) == exposition(theirs)


def test_misuse_is_refused_with_the_reason() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("t_outcomes_total", "Outcomes.", ["outcome"], registry=registry)
    with pytest.raises(ValueError, match="only goes up"):
        counter.labels("ok").inc(-1)
    with pytest.raises(ValueError, match="takes 1 label values"):
        counter.labels("ok", "extra")
    with pytest.raises(ValueError, match="takes the labels outcome; got result"):
        counter.labels(result="ok")
    with pytest.raises(ValueError, match=r"use \.labels"):
        counter.inc()
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        LoopCounter("t_outcomes_total", "Again.", ["outcome"], registry=registry)
    with pytest.raises(ValueError, match="increasing order"):
        LoopHistogram("t_bad_seconds", "Unsorted.", buckets=(0.1, 0.01), registry=registry)
