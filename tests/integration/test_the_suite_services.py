"""What the suite's in-process service (`serve_in_process`) promises the tests that start one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import NatsServer, serve_in_process


async def test_a_service_whose_start_fails_raises_an_error_the_test_can_catch(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """uvicorn's `sys.exit(3)` after a failed start escaped the event loop: one test's failed start failed the
    next tests of its worker too (15 of them, the full-disk start of test_ingest.py's DLQ test)."""
    with pytest.raises(RuntimeError, match="the service's start failed"):
        # Three copies of each stream on a server with one node: JetStream refuses the start at once.
        await serve_in_process(data_dir=tmp_path / "data", nats_url=nats_server.url, stream_replicas=3)
