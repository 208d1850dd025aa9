"""Live load run: Yate's regexroute MESSAGE recipe against yate-sipgen, side by side.

The full table of :mod:`loadrun` (100, 250 and 500 MESSAGE/s for 10 s each, to 50 recipients
and to one, both setups at Yate's default engine settings and at the ones ``--check`` prints
(``fast``: workers and ``idlemsec=1``)), printed at the end of the session. It takes several minutes, so it runs only
when asked for::

    YATE_PREFIX=/work/yate/prefix SIPGEN_LIVE_LOAD=1 .venv/bin/python -m pytest \\
        tests/live/test_live_load.py

(``SIPGEN_LIVE_LOAD_JSON=FILE`` also writes every figure as JSON.) The checks are only what
must hold on any machine, however slow: every MESSAGE gets exactly one final answer, yate-sipgen
never lets an extmodule message time out, and its answers are truthful (to 50 recipients: what
was answered 200 was delivered, and nothing it answered with a failure was delivered). Rates,
latencies and CPU figures are printed, never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

import loadrun
from yatelive import available

DURATION = float(os.environ.get("SIPGEN_LIVE_LOAD_DURATION", "10"))
RATES = (100, 250, 500)
RECIPIENTS = (50, 1)

#: (setup, workers, recipients, rate): the full table at Yate's defaults and with the yate.conf
#: settings ``--check`` prints (examples/yate.conf).
ROWS = loadrun.plan(loadrun.SETUPS, ["default", "fast"], RECIPIENTS, RATES)


def _why_not() -> str:
    if os.environ.get("SIPGEN_LIVE_LOAD") != "1":
        return "load run: set SIPGEN_LIVE_LOAD=1 (takes several minutes)"
    why = available()
    if why:
        return f"load run: {why}"
    if shutil.which("sipp") is None:
        return "load run: sipp is not on PATH"
    return ""


pytestmark = pytest.mark.skipif(bool(_why_not()), reason=_why_not() or "-")


def _row_id(row: tuple[str, str, int, int]) -> str:
    return "-".join(str(x) for x in row)


@pytest.fixture(scope="module")
def table(request, tmp_path_factory) -> Iterator[dict[str, loadrun.Row]]:
    """Runs every row once, prints the table when the module is done."""
    base = tmp_path_factory.mktemp("load")
    rows = loadrun.run_all(list(ROWS), DURATION, workdir=base, keep=True, log=None)
    by_id = {_row_id((r.setup, r.workers, r.recipients, r.rate)): r for r in rows}
    yield by_id
    text = loadrun.table(rows)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(f"MESSAGE load run, {DURATION:g} s per row (work files: {base}):")
        for line in text.splitlines():
            reporter.write_line(line)
    else:
        print(text)
    out = os.environ.get("SIPGEN_LIVE_LOAD_JSON")
    if out:
        Path(out).write_text(json.dumps({"rows": [r.as_json() for r in rows]}, indent=1))


def test_the_recipe_is_the_documented_one() -> None:
    assert loadrun.recipe_lines_in_example() == []


@pytest.mark.parametrize("spec", ROWS, ids=[_row_id(r) for r in ROWS])
def test_load_row(table: dict[str, loadrun.Row], spec: tuple[str, str, int, int]) -> None:
    setup, workers, recipients, rate = spec
    r = table[_row_id(spec)]
    where = f"{_row_id(spec)}: {loadrun.table([r]).splitlines()[-1]}"
    assert not r.error, where
    assert r.registered == recipients, where
    # every MESSAGE got exactly one final answer at the sender
    assert r.sent == int(rate * DURATION), where
    assert r.no_answer == 0 and r.uac_unexpected == 0, where
    assert r.answered == r.sent and r.answered_twice == 0, where
    if setup != "sipgen":
        return
    if r.timeouts and workers == "default":
        # Known and documented (README, Performance): at Yate's engine defaults the workers
        # held by wait=true deliveries starve Yate, and answers reach it past its timeout.
        # yate-sipgen promises no late answer only with the settings --check prints ("fast").
        pytest.xfail(f"{r.timeouts} answers past Yate's timeout at its default engine "
                     f"settings ({where})")
    assert r.timeouts == 0, (where, r.log_samples.get("timeouts"))
    assert not r.script_restarted, where
    if recipients > 1:
        # truthful answers: a 200 means delivered; a failure means not delivered. A 202 is
        # "stored, will be delivered", so a 202 message delivered later is no lie; without
        # 202s this is exactly delivered == number of 200s.
        assert r.ok_not_delivered == 0, where
        lies = {c: n for c, n in r.delivered_not_ok.items() if c != 202}
        assert lies == {}, (where, r.log_samples)
        assert r.delivered == r.ok + r.delivered_not_ok.get(202, 0), where
