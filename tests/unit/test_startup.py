"""`app.startup.start` and its signals, in-process with stand-ins: a real SIGTERM to this process."""

from __future__ import annotations

import asyncio
import os
import signal
from types import SimpleNamespace
from typing import Any

from app.startup import Stopper, start


class EndsWithASignal:
    """A start that is sent SIGTERM as it ends."""

    settings: Any = None

    def __init__(self) -> None:
        self.stopped = False

    async def start(self) -> None:
        await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    async def stop(self) -> None:
        self.stopped = True


async def test_a_signal_that_comes_as_the_start_ends_stops_the_server() -> None:
    """Its handler ran after the start's had gone: the signal was lost and the service served on."""
    loop = asyncio.get_running_loop()
    service, stopper = EndsWithASignal(), Stopper()
    try:
        if await start(service, stopper) is None:  # the start won: the server is next
            stopper.server = SimpleNamespace(should_exit=False)
            for _ in range(100):  # the loop reads the signal within a few of its turns
                if stopper.received:
                    break
                await asyncio.sleep(0.01)
            assert stopper.server.should_exit, "uvicorn serves until should_exit"
        else:
            assert service.stopped
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    assert stopper.received[:1] == [signal.SIGTERM] and stopper.exit_code == 128 + signal.SIGTERM


def test_an_embedded_nats_server_that_cannot_start_is_a_message_with_the_way_out() -> None:
    from app.embedded_nats import EmbeddedNatsError
    from app.startup import explain

    told = explain(EmbeddedNatsError("the embedded nats-server exited with code 1; see data/nats/nats-server.log"),
                   SimpleNamespace())
    assert told is not None and str(told).startswith("The embedded nats-server exited with code 1; see data/nats")
    assert "set NATS_URL" in str(told)
