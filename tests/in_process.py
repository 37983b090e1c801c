"""uvicorn serving the app in a task of the caller's event loop: the suite's in-process service
(`conftest.serve_in_process`) and the benches that time a start in their own process (`bench/memory.py`)."""

from __future__ import annotations

from typing import Any


async def served(server: Any) -> None:
    """`server.serve()` (a `uvicorn.Server`), a failed start raised as a RuntimeError. uvicorn ends a failed start with
    `sys.exit(3)`: a SystemExit raised in a task escapes the event loop itself, so a test failed with a bare
    'SystemExit: 3', and the next tests of its worker failed in their setup ('previous item was not torn down
    properly', 'Event loop stopped before Future completed'); a bench ended with status 3 and no word of why."""
    try:
        await server.serve()
    except SystemExit as exited:
        raise RuntimeError(f"the service's start failed (uvicorn exited with {exited.code}): its traceback is on "
                           "stderr (a test's captured stderr), after 'Traceback'") from None
