"""yate-sipgen in-process, for tests that step it line by line: an App attached to a list
instead of a pipe (no subprocess, no fake Yate), so a test can hold the store or order
Yate's answers itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from yate_sipgen.app import App


@asynccontextmanager
async def running_app(tmp: Path, conf: str) -> AsyncIterator[tuple[App, list[bytes]]]:
    """An App running ``conf`` (its ``{state}`` is ``tmp/state``) with its features started;
    the list collects every line it writes to Yate. Its features are closed and it is
    detached on the way out."""
    path = tmp / "sipgen.conf"
    path.write_text(conf.format(state=tmp / "state"))
    app = App(str(path))
    out: list[bytes] = []
    app.engine.attach(out.append, setlocals=app.setlocals())
    await app._start_features()
    try:
        yield app, out
    finally:
        for f in app.features:
            await f.close()
        app.engine.detach()
