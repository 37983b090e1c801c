"""Counters and a histogram for the event loop's hot paths: plain numbers, read at scrape time.

prometheus_client's own metric objects check observability, take a lock and go through a
value object on every update. /score makes three updates (a cache counter, its status
counter, its latency histogram), and the decision log two more per decision. Two counter
increments and one observation cost 18,500 instructions through prometheus_client and 4,100
here (`bench/metrics_cost.py` under callgrind); that is ~2% of a 10-candidate /score
in-process. These metrics are plain floats that only the event loop thread updates, so they
need no lock. A scrape (`GET /metrics`, served on the same loop) reads them through a custom
collector, which is prometheus_client's documented way to expose numbers it does not own. A
metric updated from another thread (the checkpoint writer's) stays a prometheus_client metric.

>>> from prometheus_client import CollectorRegistry, generate_latest
>>> registry = CollectorRegistry()
>>> answers = LoopCounter("demo_answers_total", "Answers, by status.", ["status"], registry=registry)
>>> answers.labels("200").inc()
>>> answers.labels("200").value
1.0
>>> seconds = LoopHistogram("demo_seconds", "Time spent.", buckets=(0.001, 0.01), registry=registry)
>>> seconds.observe(0.001)
>>> seconds.observe(0.5)
>>> print(generate_latest(registry).decode())
# HELP demo_answers_total Answers, by status.
# TYPE demo_answers_total counter
demo_answers_total{status="200"} 1.0
# HELP demo_seconds Time spent.
# TYPE demo_seconds histogram
demo_seconds_bucket{le="0.001"} 1.0
demo_seconds_bucket{le="0.01"} 1.0
demo_seconds_bucket{le="+Inf"} 2.0
demo_seconds_count 2.0
demo_seconds_sum 0.501
<BLANKLINE>
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


class CounterValue:
    """One labelled counter: `inc` adds to `value`. Event loop thread only."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up; inc({amount}) was asked")
        self.value += amount


class LoopCounter(Collector):
    """A counter family whose children are `CounterValue`s, exposed like prometheus_client's Counter."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._children: dict[tuple[str, ...], CounterValue] = {}
        if not self.labelnames:
            self._children[()] = CounterValue()
        registry.register(self)

    def labels(self, *values: str, **by_name: str) -> CounterValue:
        """The child for these label values, positional or by name (as prometheus_client's)."""
        if by_name:
            if values or set(by_name) != set(self.labelnames):
                raise ValueError(f"{self.name} takes the labels {', '.join(self.labelnames)}; got "
                                 f"{', '.join(map(repr, values)) or ', '.join(by_name)}")
            values = tuple(by_name[name] for name in self.labelnames)
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes {len(self.labelnames)} label values "
                             f"({', '.join(self.labelnames)}); got {len(values)}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = CounterValue()
        return child

    def inc(self, amount: float = 1.0) -> None:
        """For a family without labels."""
        if self.labelnames:
            raise ValueError(f"{self.name} has labels ({', '.join(self.labelnames)}): use .labels(...).inc()")
        self._children[()].inc(amount)

    @property
    def value(self) -> float:
        """For a family without labels."""
        return self.labels().value

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in list(self._children.items()):
            family.add_metric(key, child.value)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


class LoopHistogram(Collector):
    """A histogram without labels, exposed like prometheus_client's Histogram. Event loop thread only."""

    def __init__(self, name: str, documentation: str, *, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        bounds = [float(b) for b in buckets if b != float("inf")]
        if not bounds or bounds != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be distinct and in increasing order; got {list(buckets)}")
        self.name, self.documentation = name, documentation
        self._bounds = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)  # the last one is +Inf's own
        self.sum = 0.0
        registry.register(self)

    def observe(self, amount: float) -> None:
        # bisect_left: the first bound >= amount, as Prometheus buckets count values <= their bound.
        self._counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount

    @property
    def count(self) -> int:
        return sum(self._counts)

    def collect(self) -> Iterator[Metric]:
        cumulative, total = [], 0
        for bound, count in zip((*self._bounds, float("inf")), self._counts):
            total += count
            cumulative.append((floatToGoString(bound), float(total)))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric((), cumulative, self.sum)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation)
