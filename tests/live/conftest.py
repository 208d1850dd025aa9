"""Live tests: a real Yate from ``$YATE_PREFIX`` with yate-sipgen under it.

Every test here is skipped, with the reason, when ``YATE_PREFIX`` does not name a Yate build
(CI has none). Build one as the README ("Against a real Yate") says, then run ``YATE_PREFIX=... pytest tests/live``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from yatelive import LiveYate, available

WHY_NOT = available()


def pytest_collection_modifyitems(config, items) -> None:
    if not WHY_NOT:
        return
    here = Path(__file__).resolve().parent
    skip = pytest.mark.skip(reason=f"live Yate tests: {WHY_NOT}")
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture
def yate(tmp_path: Path) -> Iterator[Callable[..., LiveYate]]:
    """``yate(**overrides)``: a LiveYate in tmp_path (not started); all are killed after."""
    made: list[LiveYate] = []

    def make(**kw) -> LiveYate:
        y = LiveYate(tmp_path / f"yate{len(made)}", **kw)
        made.append(y)
        return y

    yield make
    for y in made:
        y.kill()
