"""The Host check against DNS rebinding (app/host_check.py) reads only a valid Host as a name."""

from __future__ import annotations

import pytest

from app.host_check import allowed_names, host_name


@pytest.mark.parametrize("value", [b"localhost:abc", b"127.0.0.1:80a", b"localhost..", b"127.0.0.1:8 0", b"[::1]:x"])
def test_an_invalid_host_is_no_name_the_service_answers_to(value: bytes) -> None:
    # RFC 9112 3.2 asks a 400 for a Host that is not valid: "localhost:abc" and "localhost.." were read as
    # "localhost", and answered.
    assert host_name(value) not in allowed_names("127.0.0.1", [])


@pytest.mark.parametrize("value", [b"localhost:8000", b"LOCALHOST", b"localhost.", b"127.0.0.1:", b"[::1]:8000"])
def test_a_valid_host_of_loopback_is_answered(value: bytes) -> None:
    assert host_name(value) in allowed_names("127.0.0.1", [])
