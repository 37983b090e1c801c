"""Decisions waiting to learn their silence: no reaction within `TIPSTREAM_SILENCE_AFTER_S`.

A team whose app publishes only the reactions it sees (a click: `acted`) gives the models
positives only, and they learn that every tip pleases. With `TIPSTREAM_SILENCE_REWARD` set,
a decision nobody reacted to within the wait is credited that reward for the tip it served
first, as Azure Personalizer's default reward did (`SilenceLearning.release`).

Each decision the join cache takes is watched until its silence is due: a heap by due time,
so the order in which decisions arrive (the ones re-read after a start come after those
/score serves meanwhile) does not matter. The heap holds one small tuple per decision of
the wait; those the join cache let go are swept out once they outnumber the live ones.

>>> silences = Silences(after_ms=600_000)
>>> silences.watch("d-2", due_ms=602_000); silences.watch("d-1", due_ms=601_000)
>>> list(silences.due(before_ms=601_500)), len(silences)
([('d-1', 601000)], 1)
>>> list(silences.due(before_ms=602_000)), list(silences.due(before_ms=602_001))
([], [('d-2', 602000)])

A wait that ended otherwise (its silence learned as a reaction was credited) is passed over when due:

>>> silences.watch("d-3", due_ms=603_000); silences.settled("d-3")
>>> list(silences.due(before_ms=700_000)), len(silences)
([], 0)
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

# The heap is swept of decisions the join cache let go once it holds this many more than the cache
# (and at least this many more): the sweep is O(n), so it runs at most once per this many watched.
SWEEP_SLACK = 10_000


class Silences:
    __slots__ = ("_heap", "_settled", "after_ms")

    def __init__(self, after_ms: int) -> None:
        self.after_ms = after_ms
        self._heap: list[tuple[int, str]] = []
        # Watched decisions whose wait ended before it was due here (`settled`), passed over when it is.
        self._settled: set[str] = set()

    def __len__(self) -> int:
        return len(self._heap)

    def watch(self, decision_id: str, due_ms: int) -> None:
        heapq.heappush(self._heap, (due_ms, decision_id))

    def settled(self, decision_id: str) -> None:
        """The watched decision's wait has ended, counted where it ended: its silence was learned as a
        reaction stored after it was due was credited (`Learner._credit`). Taken out only when due (the
        heap has no cheap removal): else its due time counted the wait again, `answered` once the reaction
        was credited to another tip, `evicted` once the join cache had let the decision go."""
        self._settled.add(decision_id)

    def drop(self, decision_ids: set[str]) -> None:
        """Stop waiting on these decisions (a forgotten user's): they left the join cache, though not for
        want of memory, which is what a due decision missing from it counts as (`evicted`)."""
        if decision_ids:
            self._heap = [item for item in self._heap if item[1] not in decision_ids]
            heapq.heapify(self._heap)
            self._settled -= decision_ids

    def due_before(self, before_ms: float) -> bool:
        """Whether a silence is due strictly before `before_ms`."""
        return bool(self._heap) and self._heap[0][0] < before_ms

    def due(self, before_ms: float) -> Iterator[tuple[str, int]]:
        """(decision id, due time) of each silence due strictly before `before_ms`, oldest first,
        each once: a reaction stored at the due time itself still counts as an answer."""
        heap, settled = self._heap, self._settled
        while heap and heap[0][0] < before_ms:
            due_ms, decision_id = heapq.heappop(heap)
            if settled and decision_id in settled:
                settled.discard(decision_id)
                continue
            yield decision_id, due_ms

    def sweep(self, held: Callable[[str], bool], held_count: int) -> int:
        """Forget the decisions no longer `held` (by the join cache) once the heap outgrows it by
        `SWEEP_SLACK`; how many were forgotten. Under load the cache's memory budget can let a
        decision go before its silence is due: without this the heap would grow with the traffic
        of the whole wait (~80 bytes a decision)."""
        if len(self._heap) <= held_count + SWEEP_SLACK:
            return 0
        kept: list[tuple[int, str]] = []
        forgotten = 0
        for item in self._heap:
            if held(item[1]):
                kept.append(item)
            elif item[1] in self._settled:  # its wait was counted when it ended
                self._settled.discard(item[1])
            else:
                forgotten += 1
        heapq.heapify(kept)
        self._heap = kept
        return forgotten
