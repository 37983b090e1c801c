"""Decoding a signal or feedback event from its JetStream message: the wire contract's verdict
(`streams.events`) with the common case in one call into pydantic-core, and the slow path to explain
(or upcast) only when that call refuses.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from streams.events import EVENT_ADAPTER, FAMILY_OF_TYPE, Rejection, check_subject, parse_event, without_nul

EXPECTED_SUBJECT = {t: f"{family}.{t}" for t, family in FAMILY_OF_TYPE.items()}
validate_json = EVENT_ADAPTER.validator.validate_json  # pydantic-core directly: no wrapper per event


def decode_wire_event(subject: str, data: bytes) -> Any:
    """A signal or feedback event from its message, or the Rejection saying why not: the contract's
    verdict (`parse_event`, then `check_subject`), the common case in one call into pydantic-core."""
    try:
        event = validate_json(data)  # the hot path
    except ValidationError:
        return _on_subject(parse_event(data), subject, data)  # the slow path explains (or upcasts)
    if subject == EXPECTED_SUBJECT[event.type]:
        return without_nul(event, data)
    return _on_subject(without_nul(event, data), subject, data)


def _on_subject(event: Any, subject: str, data: bytes) -> Any:
    # An upcast event is checked too (on its own type's subject, if renamed), and a NUL is named first, as
    # the contract does.
    return event if event.__class__ is Rejection else check_subject(event, subject, data) or event
