"""What a start takes as dead-lettered, from a DLQ that a crash mid-batch left (streams/dead_letters.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streams.dead_letters import DLQ_IN_FLIGHT, Copy, DeadLettered, batches, carried_on, dead_lettered, missing


@st.composite
def crashed_dlq(draw: st.DrawFn) -> tuple[list[tuple[str, Copy | None]], set[int], set[int]]:
    """A DLQ as ingest leaves it (each copy with its subject; None: another stream's), the dead letters
    it stored, and those it did not: batches stored whole one after another, the last in part, in any
    order, with retries of it stored after the first try's."""
    bad = sorted(draw(st.sets(st.integers(1, 400), min_size=1, max_size=60)))
    size = draw(st.integers(1, 8))
    batches = [bad[i:i + size] for i in range(0, len(bad), size)]
    subjects = ["dlq.signals.a", "dlq.signals.b", "dlq.signals.c"]
    subject_of = {seq: draw(st.sampled_from(subjects)) for seq in bad}
    log: list[tuple[str, Copy | None]] = []
    for batch in batches[:-1]:
        for seq in draw(st.permutations(batch)):
            log.append((subject_of[seq], Copy(seq, batch[0], len(batch))))
            if draw(st.booleans()):
                log.append(("dlq.feedback.x", None))
    last = batches[-1]
    stored = set(bad) - set(last)
    for _ in range(draw(st.integers(1, 3))):  # a try, and retries of what it missed
        for seq in draw(st.permutations(sorted(set(last) - stored))):
            if draw(st.booleans()):
                stored.add(seq)
                log.append((subject_of[seq], Copy(seq, last[0], len(last))))
    return log, stored, set(bad) - stored


def read_back(log: list[tuple[str, Copy | None]]) -> tuple[list[Copy], list[Copy]]:
    """The newest copy of each subject, and the copies before the newest batch's last, read back as far as
    `missing` asks (as `last_dead_lettered` reads the DLQ)."""
    newest_at: dict[str, int] = {}
    for at, (subject, copy) in enumerate(log):
        if copy is not None:
            newest_at[subject] = at
    newest = [log[at][1] for at in newest_at.values()]
    first = max((copy.first for copy in newest if copy), default=0)
    start = max((at for at in newest_at.values() if log[at][1].first == first), default=0)
    older: list[Copy] = []
    for at in range(start - 1, -1, -1):
        if not missing(newest, older):
            break
        if log[at][1] is not None:
            older.append(log[at][1])
    return newest, older


@given(crashed_dlq())
def test_a_start_takes_as_dead_lettered_exactly_what_the_dlq_holds(case) -> None:
    log, stored, lost = case
    done = dead_lettered(*read_back(log))
    assert all(seq in done for seq in stored), "stored twice"
    assert not any(seq in done for seq in lost), "never stored"


def test_an_older_batch_met_ends_the_reading_back() -> None:
    newest = [Copy(9, 7, 3)]
    assert missing(newest, [])
    assert missing(newest, [Copy(8, 7, 3)])
    assert not missing(newest, [Copy(8, 7, 3), Copy(7, 7, 3)]), "the batch is whole"
    assert not missing(newest, [Copy(5, 4, 2)]), "an older batch: the rest of this one was never stored"
    assert dead_lettered(newest, [Copy(5, 4, 2)]).upto == 6


def test_a_forged_batch_header_cannot_hide_dead_letters_below_its_own_sequence() -> None:
    from streams.dead_letters import copy_of
    from streams.jetstream import DLQ_SEQ, DLQ_STREAM

    def copy(batch: str) -> Copy | None:
        return copy_of({DLQ_STREAM: "SIGNALS", DLQ_SEQ: "7", "Tipstream-Dlq-Batch": batch}, "SIGNALS", 10)

    for forged in ("9/3", "5/0", f"5/{DLQ_IN_FLIGHT + 1}", "5", "x/2", "-1/2", "5/2/3"):
        assert copy(forged) == Copy(7, 7, 1), forged


@given(st.data())
def test_starts_after_crash_upon_crash_store_each_dead_letter_once(data: st.DataObject) -> None:
    """Run after run, each crashing mid-batch (with holes: a reconnect between copies) and with no checkpoint,
    ingest sends what a start did not find, as `DeadLettering.publish` does: each start finds exactly what the DLQ
    holds. A start's sends carried on as a batch of their own, a copy stored past their first, before the crash,
    was taken as missing at the next start, and stored twice."""
    draw = data.draw
    bad = sorted(draw(st.sets(st.integers(1, 60), min_size=1, max_size=12)))
    subjects = ["dlq.signals.a", "dlq.signals.b"]
    log: list[tuple[str, Copy | None]] = []
    stored: set[int] = set()
    for _ in range(draw(st.integers(1, 4))):
        done = dead_lettered(*read_back(log))
        assert stored == {seq for seq in bad if seq in done}
        carried = done
        crashed = False
        chunk = draw(st.integers(1, 6))  # each run's own: how many messages a pull brings varies
        for start in range(0, len(bad), chunk):
            for seqs, header in batches([seq for seq in bad[start:start + chunk] if seq not in done], carried):
                carried = carried_on(carried, seqs)
                first, count = map(int, header.split("/"))
                crashed = draw(st.booleans())
                for seq in draw(st.permutations(seqs)):
                    if not crashed or draw(st.booleans()):
                        assert seq not in stored, "stored twice"
                        stored.add(seq)
                        log.append((draw(st.sampled_from(subjects)), Copy(seq, first, count)))
                    if draw(st.booleans()):
                        log.append(("dlq.feedback.x", None))
                if crashed:
                    break
            if crashed:
                break
    done = dead_lettered(*read_back(log))
    assert stored == {seq for seq in bad if seq in done}


def test_a_batch_stored_in_part_sent_again_over_two_chunks_stays_in_part_until_the_second_is_stored() -> None:
    """A pull brings a varying number of messages: a batch's missing copies, 6 and 7 of 5 to 8, came one a
    chunk. 6 was named '5/3' (what was found, and sent by then), so a crash before 7 was sent left the next
    start a whole batch of 3, and 7, below its highest, was taken as stored: never dead-lettered."""
    log = [("dlq.signals.a", Copy(5, 5, 4)), ("dlq.signals.a", Copy(8, 5, 4))]
    carried = dead_lettered(*read_back(log))
    assert carried == DeadLettered(upto=4, above=frozenset({5, 8}), first=5, count=4)
    [(seqs, header)] = batches([6], carried)
    first, count = map(int, header.split("/"))
    log.append(("dlq.signals.a", Copy(6, first, count)))
    assert 7 not in dead_lettered(*read_back(log)), "the crash came before 7's chunk"
    carried = carried_on(carried, seqs)
    assert batches([7], carried) == [([7], "5/4")] and carried_on(carried, [7]) is None
