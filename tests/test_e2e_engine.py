"""End-to-end tests: the real ``scripts/yate-sipgen`` run as a subprocess, as Yate runs it.

Pipe mode goes through :class:`fakeyate.FakeYate` (the Yate side of the pipe, faithful to
``/work/shared/reference/yate-internals.md``, "ref §N"): argv[1] is the config file path, the
config lives in ``tmp_path`` with a relative ``state_dir`` (so state goes to ``tmp_path``, never
into the repository), and the fake's working directory is another directory (Yate's cwd is not
the script's). Socket mode goes through :class:`ListenerStub`, a minimal extmodule
``[listener]`` without a role, written here.

Handlers that misbehave on purpose come from ``tests/e2e_helpers/ext_*.py``, loaded by the
script through ``[general] extensions=``.

Every test asserts on what Yate would see, and on ``fy.failures == []`` (no line Yate would
reject, no overflow, no unmatched answer) wherever that applies. Each scenario runs in
``asyncio.run`` with a hard time bound.
"""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional


try:  # plain import when tests/ is on sys.path (pytest's default "prepend" mode)
    import yate_rules as yr
    from fakeyate import FakeYate, YMessage
except ImportError:  # pragma: no cover - tests/ turned into a package
    from tests import yate_rules as yr  # type: ignore[no-redef]
    from tests.fakeyate import FakeYate, YMessage  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "yate-sipgen")
EXAMPLE_CONF = ROOT / "examples" / "sipgen.conf"
HELPERS = Path(__file__).resolve().parent / "e2e_helpers"
EXT = str(HELPERS / "ext_behaviours.py")
EXT_CRASH = str(HELPERS / "ext_crash.py")

CONSOLE_MESSAGES = ("engine.status", "engine.command", "engine.help", "engine.init", "engine.debug")


# ==========================================================================
# helpers
# ==========================================================================


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    """Run one async scenario with a hard upper bound."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(bounded())


def write_conf(path: Path, general: Optional[dict[str, Any]] = None,
               connection: Optional[dict[str, Any]] = None) -> str:
    """A sipgen.conf at *path*; ``state_dir`` defaults to ``state`` next to it."""
    g = {"state_dir": "state"}
    g.update(general or {})
    lines = ["; written by test_e2e_engine", "[general]"]
    lines += [f"{k}={v}" for k, v in g.items()]
    if connection:
        lines += ["", "[connection]"] + [f"{k}={v}" for k, v in connection.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def yate_cwd(tmp_path: Path) -> str:
    """Yate's working directory: deliberately not the config file's directory."""
    d = tmp_path / "yate-cwd"
    d.mkdir(exist_ok=True)
    return str(d)


def fake(tmp_path: Path, conf: str, **kw: Any) -> FakeYate:
    return FakeYate(SCRIPT, conf, cwd=yate_cwd(tmp_path), script_name="sipgen", **kw)


async def ready(fy: FakeYate, timeout: float = 10.0) -> None:
    """Wait until the current script installed its console handlers and has read every reply.

    The round trip of one ``engine.status`` guarantees that the script processed the
    ``%%<setlocal`` / ``%%<install`` replies written before it (lines are read in order).
    """
    for name in CONSOLE_MESSAGES:
        await fy.wait_installed(name, timeout)
    r = await fy.dispatch("engine.status", {"module": "sipgen"})
    assert r.answered, r


async def command(fy: FakeYate, line: str, **extra: str) -> YMessage:
    """rmanager: an unknown command line becomes ``engine.command line=...`` (ref §4.2)."""
    return await fy.dispatch("engine.command", {"line": line, **extra})


def stats_of(text: str) -> dict[str, str]:
    """``sipgen stats`` output (``key=value\\r\\n`` lines) as a dict."""
    out = {}
    for ln in text.split("\r\n"):
        if "=" in ln:
            k, _, v = ln.partition("=")
            out[k] = v
    return out


async def stats(fy: FakeYate) -> dict[str, str]:
    r = await command(fy, "sipgen stats")
    assert r.handled, r
    return stats_of(r.retval)


def inject_raw(fy: FakeYate, line: bytes) -> None:
    """Write a raw line to the script's stdin (garbage Yate itself would never send).

    Each write is one whole line, so it cannot split a line the fake is writing.
    """
    assert fy.proc is not None and fy.proc.stdin is not None
    fy.proc.stdin.write(line + b"\n")


def answers_by_id(fy: FakeYate) -> collections.Counter[bytes]:
    """How many ``%%<message:<id>:`` answer lines the script wrote per id (watch ids are empty)."""
    c: collections.Counter[bytes] = collections.Counter()
    for line in fy.lines_from_script():
        if line.startswith(b"%%<message:"):
            c[line.split(b":", 2)[1]] += 1
    return c


def debug_texts(fy: FakeYate, needle: str) -> list[tuple[int, str]]:
    return [(lvl, t) for lvl, t in fy.debug_lines if needle in t]


def setlocal_lines(fy: FakeYate, name: str) -> list[bytes]:
    return [ln for ln in fy.lines_from_script() if ln.startswith(b"%%>setlocal:" + name.encode() + b":")]


def read_lifecycle(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "state" / "lifecycle.json").read_text())


# ==========================================================================
# 1. Started as Yate starts it
# ==========================================================================


def test_started_with_example_conf_sets_locals_then_installs_console_handlers(tmp_path: Path) -> None:
    conf = tmp_path / "sipgen.conf"
    shutil.copy(EXAMPLE_CONF, conf)  # the shipped file, copied so its state_dir is in tmp_path

    async def scenario() -> None:
        async with fake(tmp_path, str(conf)) as fy:
            await ready(fy)
            s = fy.settings
            assert s["trackparam"] == "sipgen"
            assert s["bufsize"] == 65536
            assert s["timeout"] == 10000  # the example's timeout
            assert s["maxqueue"] == 5000  # the example's maxqueue
            assert s["restart"] is True
            assert set(CONSOLE_MESSAGES) <= set(fy.installs)
            out = fy.lines_from_script()
            # every reply says ok: Yate accepted each setlocal and install as written
            replies = [ln for ln in fy.lines_to_script() if ln.startswith((b"%%<setlocal:", b"%%<install:"))]
            assert replies and all(ln.endswith(b":true") for ln in replies), replies
            # bufsize is raised before anything else could need it; installs after setlocals
            first_install = min(i for i, ln in enumerate(out) if ln.startswith(b"%%>install:"))
            assert out.index(b"%%>setlocal:bufsize:65536") < first_install
            assert out.index(b"%%>setlocal:trackparam:sipgen") < first_install
            assert b"%%>setlocal:restart:true" in out
            assert fy.failures == []
            assert fy.proc is not None and fy.proc.returncode is None
        # relative state_dir: next to the config file, not in Yate's working directory
        assert (tmp_path / "state" / "lifecycle.json").is_file()
        assert not (tmp_path / "yate-cwd" / "state").exists()
        assert fy.spawn_count == 1

    run(scenario)


def test_status_sipgen_one_line_overview_appends_unhandled_others_left_alone(tmp_path: Path) -> None:
    conf = tmp_path / "sipgen.conf"
    shutil.copy(EXAMPLE_CONF, conf)

    async def scenario() -> None:
        async with fake(tmp_path, str(conf)) as fy:
            await ready(fy)
            # status sipgen: handled, exactly one Yate-format line
            r = await fy.dispatch("engine.status", {"module": "sipgen"})
            assert r.answered and r.handled
            assert r.retval.startswith("name=sipgen,type=misc;")
            assert r.retval.endswith("\r\n") and r.retval.count("\r\n") == 1
            assert "\n" not in r.retval[:-1] and "\r" not in r.retval[:-2]
            head = r.retval[:-2].split(";")[1]
            fields = dict(kv.split("=", 1) for kv in head.split(","))
            assert fields["state"] == "running"
            assert "uptime" in fields and "handled" in fields
            # the overview: our line appended after the others', and left unhandled
            before = "name=engine,type=system;uptime=1\r\n"
            r = await fy.dispatch("engine.status", {"details": "false"}, retval=before)
            assert r.answered and not r.handled
            assert r.retval.startswith(before)
            ours = r.retval[len(before):]
            assert ours.startswith("name=sipgen,type=misc;") and ours.endswith("\r\n")
            assert ours.count("\r\n") == 1
            # another module's status: left alone (unhandled, retval unchanged)
            r = await fy.dispatch("engine.status", {"module": "ysipchan"}, retval="x\r\n")
            assert r.answered and not r.handled and r.retval == "x\r\n"
            assert fy.failures == []

    run(scenario)


# ==========================================================================
# 2. 1,000 messages in flight, garbage mixed in
# ==========================================================================

#: lines no Yate would ever write: each must be dropped (and logged), never answered
GARBAGE = [
    b"this is not a protocol line",
    b"%%>message:only:three",
    b"%%>message:gid1:notatime:x.y:",
    b"%%>message:gid2:0:x.y::k=%q",
    b"%%<install:abc",
    b"%%<setlocal:broken",
    b"\x01\x02 raw control bytes",
    b"\xff\xfe\xfd not utf-8 and no keyword",
    b"%%>bogus:keyword",
    b"%%<message:gid3:maybe:x:",
]


def test_thousand_messages_in_flight_with_garbage_each_answered_exactly_once(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf", {"extensions": EXT})
    n = 1000

    async def scenario() -> None:
        # debuglevel 10 so that the script sends its warnings about the bad lines
        async with fake(tmp_path, conf, debuglevel=10) as fy:
            await ready(fy)
            await fy.wait_installed("sip.slow")
            earlier = set(answers_by_id(fy))
            peak = 0

            async def sample() -> None:  # how many wait for the script at the same time
                nonlocal peak
                while True:
                    peak = max(peak, fy.queue_length)
                    await asyncio.sleep(0.002)

            sampler = asyncio.ensure_future(sample())
            tasks: list[asyncio.Task[YMessage]] = []
            injected = 0
            for i in range(n):
                kind = i % 10
                if kind == 0:
                    coro = fy.dispatch("engine.status", {"module": "sipgen", "n": str(i)})
                elif kind == 1:
                    coro = command(fy, "sipgen stats", n=str(i))
                else:
                    coro = fy.dispatch("sip.slow", {"sleep": f"{0.8 + (i % 7) * 0.05:.2f}", "n": str(i)})
                tasks.append(asyncio.ensure_future(coro))
                if i % 10 == 5:
                    await asyncio.sleep(0)  # let the fake write what is queued, then garbage
                    inject_raw(fy, GARBAGE[injected % len(GARBAGE)])
                    injected += 1
            results = await asyncio.gather(*tasks)
            sampler.cancel()
            # the 800 sip.slow (0.8-1.1 s each) were all waiting for the script at once
            assert peak >= n * 8 // 10, peak
            assert fy.timeouts == [] and fy.refusals == []
            assert [r.outcome for r in results] == ["answered"] * n
            for i, r in enumerate(results):
                assert r.get("n") == str(i)
                assert r.handled, r
                if r.name == "sip.slow":
                    assert r.get("slept") and r.get("code") is None
            # exactly once: one answer line per id, and no answer for an unknown id
            counts = answers_by_id(fy)
            ids = {r.id.encode() for r in results}
            assert len(ids) == n
            assert {i: c for i, c in counts.items() if c != 1} == {}
            assert set(counts) - earlier - {b""} == ids
            # still alive and serving; every garbage line was counted and logged
            assert fy.alive and fy.proc is not None and fy.proc.returncode is None
            st = await stats(fy)
            assert st.get("bad_line") == str(injected)
            await fy.wait_until(lambda: len(debug_texts(fy, "bad line")) >= injected, 5.0,
                                "a %%>debug line per bad line")
            assert len(debug_texts(fy, "bad line")) == injected
            assert fy.failures == []

    run(scenario, timeout=45)


# ==========================================================================
# 3. Long lines
# ==========================================================================


def _big_value(size: int) -> str:
    # every escape class: ':' '%' control bytes, '=' and non-ASCII
    unit = "ab:%\n=\u00e9\t"
    return (unit * (size // len(unit.encode()) + 1))[: size // 2] + "y" * (size - size // 2)


def test_200kb_line_from_yate_is_handled_and_script_survives(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf", {"extensions": EXT})
    big = _big_value(200 * 1024)

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            await fy.wait_installed("sip.echo")
            r = await fy.dispatch("sip.echo", {"big": big, "after": "kept"})
            assert r.answered and r.handled
            assert r.get("size") == str(len(big))  # the script saw every byte of the param
            assert r.get("big") == big and r.get("after") == "kept"
            r = await fy.dispatch("engine.status", {"module": "sipgen", "pad": big})
            assert r.answered and r.handled and r.retval.startswith("name=sipgen,")
            r = await fy.dispatch("sip.echo", {"big": "small"})
            assert r.answered and r.get("size") == "5"
            assert fy.alive and fy.proc.returncode is None
            assert fy.failures == []

    run(scenario)


def test_answer_too_long_for_yates_buffer_becomes_the_failure_answer(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf", {"extensions": EXT})
    big = "z" * (100 * 1024)  # echoed back: far over bufsize-2 = 65534

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            await fy.wait_installed("sip.echo")
            r = await fy.dispatch("sip.echo", {"big": big, "echo": "yes"})
            # never an overflow (that would kill the script), never dropped: sip.* -> true + 500
            assert r.answered and r.handled and r.get("code") == "500"
            assert r.get("copy") is None
            assert fy.alive and fy.proc.returncode is None
            st = await stats(fy)
            assert st.get("answer_too_long") == "1"
            assert fy.failures == []

    run(scenario)


# ==========================================================================
# 4. stdin EOF, restart
# ==========================================================================


def test_stdin_eof_exits_within_100ms_and_yate_respawns_it(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf", {"restart": "true"})
    runs = 5
    grace = 0.4  # SIGTERM only this long after EOF, so an exit before it is the script's own

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with fake(tmp_path, conf, kill_grace_ms=int(grace * 1000)) as fy:
            delays = []
            pids = []
            for i in range(runs):
                await ready(fy)
                assert fy.spawn_count == i + 1
                assert fy.settings["restart"] is True
                proc = fy.proc
                pids.append(proc.pid)
                t0 = loop.time()
                closing = asyncio.ensure_future(fy.close_stdin(respawn=True))
                await asyncio.wait_for(proc.wait(), 3.0)
                delays.append(loop.time() - t0)
                await closing  # Yate's die(): respawns at once because restart is set
            await ready(fy)
            assert fy.spawn_count == runs + 1
            assert len(set(pids + [fy.proc.pid])) == runs + 1
            assert statistics.median(delays) < 0.100, delays
            assert max(delays) < grace, delays  # never needed the SIGTERM
            assert not any(d == "EVT" and b"SIGTERM" in ln for d, ln in fy.transcript)
            assert fy.exit_codes[:runs] == [0] * runs
            assert fy.failures == []
        assert read_lifecycle(tmp_path)["crashes"] == 0  # EOF is a clean exit, not a crash

    run(scenario, timeout=30)


# ==========================================================================
# 5. Deadlines and failing handlers
# ==========================================================================


def test_overrunning_sip_handler_is_answered_500_before_yates_timeout(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf",
                      {"extensions": EXT, "timeout": 2000, "answer_margin": 500})

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            await fy.wait_installed("sip.slow")
            assert fy.settings["timeout"] == 2000
            t0 = loop.time()
            slow = asyncio.ensure_future(fy.dispatch("sip.slow", {"sleep": "5"}))
            await asyncio.sleep(0.05)
            quick = await fy.dispatch("sip.slow", {"sleep": "0.01"})
            t_quick = loop.time() - t0
            r = await slow
            t_slow = loop.time() - t0
            # a slow handler never delays the others
            assert quick.answered and quick.handled and quick.get("code") is None
            assert t_quick < 1.0
            # the overrun one: answered by the script (not released by Yate's timeout)
            assert r.outcome == "answered" and not r.timed_out
            assert r.handled and r.get("code") == "500" and r.get("slept") is None
            assert 1.3 <= t_slow < 2.0, t_slow
            assert fy.timeouts == []
            st = await stats(fy)
            assert st.get("answer_deadline") == "1"
            assert st.get("code500") == "1"
            assert fy.failures == []

    run(scenario)


def test_raising_sip_handler_is_answered_handled_with_code_500(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf", {"extensions": EXT})

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            await fy.wait_installed("sip.raisesync")
            for name in ("sip.raise", "sip.raisesync"):  # async and plain handlers
                r = await fy.dispatch(name, {"a": "1"}, retval="rv")
                assert r.answered and r.handled, r
                assert r.get("code") == "500"
                assert r.get("half_done") is None  # the failed handler's changes are dropped
                assert r.retval == "rv" and r.get("a") == "1"
            st = await stats(fy)
            assert st.get("handler_error") == "2"
            assert st.get("errors") == "2"
            # logged where Yate's default level shows it
            assert len(debug_texts(fy, "failed")) >= 2
            assert fy.failures == []

    run(scenario)


def test_raising_non_sip_handler_is_answered_unhandled_and_unchanged(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf", {"extensions": EXT})

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            await fy.wait_installed("test.raise")
            params = [("a", "1"), ("b", "x:y%z"), ("a", "dup")]
            r = await fy.dispatch("test.raise", params, retval="orig")
            assert r.answered and not r.handled
            assert r.name == "test.raise" and r.retval == "orig"
            assert [kv for kv in r.params if kv[0] != "handlers"] == params
            assert r.get("code") is None and r.get("tampered") is None
            st = await stats(fy)
            assert st.get("handler_error") == "1"
            assert fy.failures == []

    run(scenario)


# ==========================================================================
# 6. Overload
# ==========================================================================


def test_overload_sheds_excess_sip_with_503_and_retry_after_at_once(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf", {"extensions": EXT, "max_in_progress": 5})

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            await fy.wait_installed("sip.slow")
            t0 = loop.time()

            async def one(i: int) -> tuple[YMessage, float]:
                r = await fy.dispatch("sip.slow", {"sleep": "0.8", "n": str(i)})
                return r, loop.time() - t0

            results = await asyncio.gather(*(one(i) for i in range(20)))
            shed = [(r, t) for r, t in results if r.get("code") == "503"]
            served = [(r, t) for r, t in results if r.get("code") is None]
            assert len(served) == 5 and len(shed) == 15, [r.params for r, _ in results]
            for r, t in shed:
                assert r.answered and r.handled  # handled + code: not Yate's 405
                assert r.get("osip_Retry-After"), r.params
                assert t < 0.5, t  # at once, not after the slow ones
            for r, t in served:
                assert r.answered and r.handled and r.get("slept") == "0.8"
                assert t >= 0.75
            st = await stats(fy)
            assert st.get("overload") == "15" and st.get("code503") == "15"
            assert fy.failures == []

    run(scenario)


# ==========================================================================
# 7. Console
# ==========================================================================


def test_sipgen_stats_prints_counters_one_per_line(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf")

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            r = await command(fy, "sipgen stats")
            assert r.answered and r.handled
            assert r.retval.endswith("\r\n")
            lines = r.retval[:-2].split("\r\n")
            assert all("=" in ln for ln in lines), lines
            st = stats_of(r.retval)
            assert st["state"] == "running"
            assert int(st["handled"]) >= 2 and "uptime" in st
            assert st.get("engine.command") == "1" and int(st.get("engine.status", "0")) >= 1
            assert fy.failures == []

    run(scenario)


def test_sipgen_alone_prints_usage_unknown_subcommand_says_so_other_lines_left_alone(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf")

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            r = await command(fy, "sipgen")
            assert r.answered and r.handled
            for sub in ("stats", "reload", "restart", "more"):
                assert f"sipgen {sub}" in r.retval
            usage = r.retval
            r = await command(fy, "sipgen frobnicate")
            assert r.handled and "frobnicate" in r.retval and "Unknown" in r.retval
            assert "sipgen stats" in r.retval
            # somebody else's command: not ours, left unhandled and untouched
            r = await command(fy, "sipgenx stats")
            assert r.answered and not r.handled and r.retval == ""
            r = await fy.dispatch("engine.command", {"line": "status"}, retval="prev")
            assert not r.handled and r.retval == "prev"
            assert usage.endswith("\r\n")
            assert fy.failures == []

    run(scenario)


def test_sipgen_reload_applies_valid_change_and_keeps_running_config_on_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "sipgen.conf"
    conf = write_conf(path, {"timeout": 3000, "answer_margin": 500})

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            assert fy.settings["timeout"] == 3000
            write_conf(path, {"timeout": 4000, "answer_margin": 500})
            r = await command(fy, "sipgen reload")
            assert r.answered and r.handled and "reloaded" in r.retval.lower()
            await fy.wait_until(lambda: fy.settings["timeout"] == 4000, 3.0, "setlocal timeout 4000")
            # a broken file: the reply says why; the running configuration stays
            path.write_text("[general]\nstate_dir=state\ntimeout=soon\n", encoding="utf-8")
            r = await command(fy, "sipgen reload")
            assert r.answered and r.handled
            assert "failed" in r.retval.lower() and "kept" in r.retval.lower()
            assert "timeout" in r.retval and str(path) in r.retval
            await asyncio.sleep(0.1)
            assert fy.settings["timeout"] == 4000
            assert setlocal_lines(fy, "timeout") == [b"%%>setlocal:timeout:3000", b"%%>setlocal:timeout:4000"]
            assert debug_texts(fy, "reload failed")  # and in Yate's log (DebugConf)
            r = await fy.dispatch("engine.status", {"module": "sipgen"})
            assert "state=running" in r.retval
            assert fy.failures == []

    run(scenario)


def test_tab_completion_offers_our_name_and_subcommands_and_stays_unhandled(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf")

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)

            async def complete(partline: str, partword: str, retval: str = "") -> YMessage:
                r = await fy.dispatch("engine.command", {"partial": f"{partline} {partword}".strip(),
                                                         "partline": partline, "partword": partword},
                                      retval=retval)
                assert r.answered and not r.handled  # others add their words too
                return r

            r = await complete("", "sip", retval="\tsip")
            assert r.retval.split("\t") == ["", "sip", "sipgen"]
            r = await complete("", "zz")
            assert r.retval == ""
            r = await complete("sipgen", "re")
            assert sorted(r.retval.split("\t")[1:]) == ["reload", "restart"]
            r = await complete("sipgen", "")
            assert {"stats", "reload", "restart", "more"} <= set(r.retval.split("\t")[1:])
            r = await complete("help", "s")
            assert "sipgen" in r.retval.split("\t")
            assert fy.failures == []

    run(scenario)


def test_help_broadcast_appends_usage_line_and_help_sipgen_gives_full_text(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf")

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            before = "  status [overview] [modulename]\r\n"
            r = await fy.dispatch("engine.help", {}, retval=before, broadcast=True)
            assert r.answered and not r.handled
            assert r.retval.startswith(before)
            added = r.retval[len(before):]
            assert added.startswith("  sipgen") and added.endswith("\r\n") and added.count("\r\n") == 1
            r = await fy.dispatch("engine.help", {"line": "sipgen"})
            assert r.answered and r.handled
            assert "sipgen reload" in r.retval and "sipgen stats" in r.retval
            r = await fy.dispatch("engine.help", {"line": "status"}, retval="x")
            assert not r.handled and r.retval == "x"
            assert fy.failures == []

    run(scenario)


def test_engine_init_for_all_or_sipgen_reloads_config_other_plugins_do_not(tmp_path: Path) -> None:
    path = tmp_path / "sipgen.conf"
    conf = write_conf(path, {"timeout": 3000, "answer_margin": 500})

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            write_conf(path, {"timeout": 4000, "answer_margin": 500})
            r = await fy.dispatch("engine.init", {"plugin": "ysipchan"}, broadcast=True)
            assert r.answered and not r.handled
            await asyncio.sleep(0.3)
            assert fy.settings["timeout"] == 3000  # not for us
            r = await fy.dispatch("engine.init", {}, broadcast=True)  # plain "reload"
            assert r.answered and not r.handled
            await fy.wait_until(lambda: fy.settings["timeout"] == 4000, 3.0, "reload on engine.init")
            write_conf(path, {"timeout": 5000, "answer_margin": 500})
            r = await fy.dispatch("engine.init", {"plugin": "sipgen"}, broadcast=True)  # reload sipgen
            assert r.answered and not r.handled
            await fy.wait_until(lambda: fy.settings["timeout"] == 5000, 3.0, "reload sipgen")
            assert fy.failures == []

    run(scenario)


def test_debug_sipgen_level_replies_and_sets_yates_debuglevel(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf")

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            assert fy.settings["debuglevel"] == 5
            r = await fy.dispatch("engine.debug", {"module": "sipgen", "line": "level 10"})
            assert r.answered and r.handled
            assert r.retval == "Module sipgen debug on level 10\r\n"
            await fy.wait_line(b"%%>setlocal:debuglevel:10")
            await fy.wait_until(lambda: fy.settings["debuglevel"] == 10, 3.0, "debuglevel 10")
            r = await fy.dispatch("engine.debug", {"module": "ysipchan", "line": "level 9"}, retval="")
            assert r.answered and not r.handled and r.retval == ""
            assert fy.settings["debuglevel"] == 10
            assert fy.failures == []

    run(scenario)


def test_long_command_output_is_paged_and_sipgen_more_gives_the_rest(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_ext_behaviours_for_test", EXT)
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    expected = ext.BIG_TEXT
    assert len(expected) > 100_000
    conf = write_conf(tmp_path / "sipgen.conf", {"extensions": EXT})

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            hint = "-- more: 'sipgen more' --\r\n"
            r = await command(fy, "sipgen big")
            assert r.answered and r.handled
            assert r.retval.endswith(hint)
            assert fy.failures == []  # the first page fit in Yate's buffer
            pages = [r.retval[: -len(hint)]]
            for _ in range(20):
                r = await command(fy, "sipgen more")
                assert r.answered and r.handled
                if r.retval.endswith(hint):
                    pages.append(r.retval[: -len(hint)])
                    continue
                pages.append(r.retval)
                break
            assert len(pages) >= 2
            assert "".join(pages) == expected  # nothing lost, nothing repeated
            r = await command(fy, "sipgen more")
            assert r.handled and "Nothing more" in r.retval
            assert fy.failures == []
            assert fy.alive

    run(scenario)


# ==========================================================================
# 8. sipgen restart
# ==========================================================================


def test_sipgen_restart_replies_exits_and_yate_respawns_it_with_same_argument(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf", {"restart": "false"})

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            assert fy.settings["restart"] is False
            first = fy.proc
            r = await command(fy, "sipgen restart")
            assert r.answered and r.handled and "restart" in r.retval.lower()
            # restart set (config said false), then exit; Yate respawns at once
            await fy.wait_line(b"%%>setlocal:restart:true")
            await asyncio.wait_for(first.wait(), 3.0)
            assert first.returncode == 0
            await fy.wait_until(lambda: fy.spawn_count == 2, 3.0, "respawn")
            await ready(fy)
            assert fy.proc.pid != first.pid
            cmdline = Path(f"/proc/{fy.proc.pid}/cmdline").read_bytes().split(b"\0")[:-1]
            assert cmdline[-1] == conf.encode()  # the same single argument
            assert fy.settings["restart"] is False  # the new run follows its config again
            assert fy.failures == []
        assert read_lifecycle(tmp_path)["crashes"] == 0  # a restart is not a crash

    run(scenario)


# ==========================================================================
# 9. Bad config at start
# ==========================================================================


def test_bad_config_at_start_says_why_once_no_restart_no_spin_status_shows_error(tmp_path: Path) -> None:
    path = tmp_path / "sipgen.conf"
    path.write_text("[general]\nstate_dir=state\ntimeout=soon\n", encoding="utf-8")
    conf = str(path)

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            await asyncio.sleep(1.0)
            assert fy.proc.returncode is None and fy.alive
            assert fy.spawn_count == 1
            assert fy.settings["restart"] is False
            assert b"%%>setlocal:restart:true" not in fy.lines_from_script()

            def says_why(text: str) -> bool:
                return conf in text and "timeout" in text

            outs = [t for t in fy.output_lines if says_why(t)]
            dbgs = [t for _, t in fy.debug_lines if says_why(t)]
            assert outs or dbgs, (fy.output_lines, fy.debug_lines)
            # once: not repeated (at most one line per channel for the one start)
            assert len(outs) <= 1 and len(dbgs) <= 1, (outs, dbgs)
            r = await fy.dispatch("engine.status", {"module": "sipgen"})
            assert r.handled and "state=config-error" in r.retval
            # nothing but the console is installed
            assert set(fy.installs) == set(CONSOLE_MESSAGES)
            assert fy.failures == []
        assert not (tmp_path / "state" / "lifecycle.json").exists() or \
            read_lifecycle(tmp_path).get("crashes", 0) == 0

    run(scenario)


def test_bad_config_fixed_then_sipgen_restart_starts_the_service(tmp_path: Path) -> None:
    path = tmp_path / "sipgen.conf"
    path.write_text("[general]\nstate_dir=state\nmax_in_progress=many\n", encoding="utf-8")

    async def scenario() -> None:
        async with fake(tmp_path, str(path)) as fy:
            await ready(fy)
            r = await command(fy, "sipgen reload")
            assert r.handled and "max_in_progress" in r.retval  # still broken: says why
            write_conf(path, {"max_in_progress": 50})
            r = await command(fy, "sipgen reload")
            assert r.handled and "valid" in r.retval.lower()
            r = await command(fy, "sipgen restart")
            assert r.handled
            await fy.wait_until(lambda: fy.spawn_count == 2, 5.0, "respawn after restart")
            await ready(fy)
            assert fy.settings["restart"] is True  # the default, now that the config is good
            r = await fy.dispatch("engine.status", {"module": "sipgen"})
            assert "state=running" in r.retval
            assert fy.failures == []

    run(scenario)


# ==========================================================================
# 10. Crash back-off
# ==========================================================================


def test_crash_loop_backs_off_with_crash_counter_on_disk(tmp_path: Path) -> None:
    # The extension kills the process (os._exit(1)) 0.3 s after each connection; Yate respawns
    # at once (restart=true). Lifecycle: 1st crash -> respawn at once, 2nd -> wait 2 s.
    conf = write_conf(tmp_path / "sipgen.conf", {"extensions": EXT_CRASH, "restart": "true"})
    connects = tmp_path / "state" / "connects.txt"

    def times() -> list[float]:
        try:
            return [float(x) for x in connects.read_text().split()]
        except OSError:
            return []

    async def scenario() -> None:
        async with fake(tmp_path, conf, max_spawns=10) as fy:
            await fy.wait_until(lambda: len(times()) >= 2, 5.0, "second start")
            await fy.wait_until(lambda: fy.spawn_count >= 3, 5.0, "third spawn")
            await fy.wait_until(lambda: read_lifecycle(tmp_path).get("crashes") == 2, 3.0,
                                "crash counter 2")
            spawned_third = time.time()
            await fy.wait_until(lambda: len(times()) >= 3, 6.0, "third start")
            t = times()
            # one crash: restarted at once; a crash loop: the third run waited (2 s) first
            assert t[2] - t[1] >= 2.0, t
            assert t[2] - t[1] >= (t[1] - t[0]) + 1.0, t
            assert time.time() - spawned_third >= 1.0 - 0.2
            assert fy.exit_codes[:2] == [1, 1]
            assert "crashed" in fy.stderr  # says so on Yate's console (fd 2)
            # nothing installed during the wait: no line to Yate before it was over
            assert fy.failures == []

    run(scenario, timeout=20)


# ==========================================================================
# 11. Logging safety and level filtering
# ==========================================================================


def test_log_text_is_escaped_and_filtered_by_yates_debuglevel(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf", {"extensions": EXT})

    def clean(text: str) -> bool:
        return not any(c in text for c in "\r\n\x1b\x07")

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:  # Yate's debuglevel: 5
            await ready(fy)
            r = await command(fy, "sipgen log")
            assert r.handled
            await fy.wait_until(lambda: debug_texts(fy, "E-unsafe"), 3.0, "the error line")
            await asyncio.sleep(0.1)
            (lvl, text), = debug_texts(fy, "E-unsafe")
            assert lvl <= 5 and clean(text) and "a" in text and "b[31m" in text
            raw = [ln for ln in fy.lines_from_script() if b"E-unsafe" in ln]
            assert len(raw) == 1 and b"\x1b" not in raw[0]
            # below Yate's level: not sent at all
            assert not debug_texts(fy, "I-info") and not debug_texts(fy, "D-debug")
            assert not any(b"I-info" in ln or b"D-debug" in ln for ln in fy.lines_from_script())
            r = await fy.dispatch("engine.debug", {"module": "sipgen", "line": "level 10"})
            assert r.handled
            await fy.wait_until(lambda: fy.settings["debuglevel"] == 10, 3.0, "debuglevel 10")
            r = await command(fy, "sipgen log")
            await fy.wait_until(lambda: debug_texts(fy, "D-debug"), 3.0, "the debug line")
            (lvl_i, _), = debug_texts(fy, "I-info")
            (lvl_d, _), = debug_texts(fy, "D-debug")
            assert 5 < lvl_i <= 10 and lvl_d == 10
            warned = debug_texts(fy, "W-unsafe")
            assert warned and all(clean(t) for _, t in warned)
            assert all(clean(t) for _, t in fy.debug_lines)
            assert fy.failures == []

    run(scenario)


# ==========================================================================
# 12. Socket mode
# ==========================================================================


class StubConn:
    """One accepted connection of :class:`ListenerStub` (an extmodule listener without role)."""

    def __init__(self, stub: "ListenerStub", reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stub = stub
        self.reader = reader
        self.writer = writer
        self.lines: list[bytes] = []
        self.role_known = False
        self.bufsize = yr.DEF_BUFSIZE
        self.installs: dict[str, int] = {}
        self.setlocals: dict[str, bytes] = {}
        self.waiting: dict[bytes, tuple[yr.WireMessage, asyncio.Future[tuple[bool, yr.WireMessage]]]] = {}
        self.closed = asyncio.Event()
        self._seq = 0

    def send(self, line: bytes) -> None:
        self.writer.write(line + b"\n")

    async def run(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    return
                buf += data
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        if len(buf) > self.bufsize - 2:
                            self.stub.failures.append("overflow: line over bufsize-2")
                            return
                        break
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if line.endswith(b"\r"):
                        line = line[:-1]
                    if line:
                        self.process(line)
        except (ConnectionError, OSError):
            return
        finally:
            self.closed.set()
            self.writer.close()

    def process(self, line: bytes) -> None:
        self.lines.append(line)
        for problem in yr.check_script_line(line, bufsize=self.bufsize, role_known=self.role_known):
            self.stub.failures.append(f"{problem} | {line[:200]!r}")
        if not self.role_known:  # ref §1.4.9: only %%>connect is accepted, else closed
            if yr.script_line_keyword(line, role_known=False) == "connect":
                self.role_known = True
            else:
                self.writer.close()
            return
        kind = yr.script_line_keyword(line)
        if kind == "setlocal":
            parsed = yr.parse_setlocal(line[len(b"%%>setlocal:"):])
            assert parsed is not None
            name, value = parsed
            if name == b"bufsize":
                self.bufsize = yr.yate_to_integer(value, self.bufsize, yr.MIN_BUFSIZE, yr.MAX_BUFSIZE)
                value = str(self.bufsize).encode()
            elif name == b"debuglevel" and not value:
                value = b"5"
            elif name == b"restart":  # no pid: restart is impossible on a socket (ref §1.7)
                self.stub.failures.append("setlocal restart on a socket connection")
                value = b"false"
            self.setlocals[name.decode()] = value
            self.send(b"%%<setlocal:" + name + b":" + value + b":true")
        elif kind == "install":
            req = yr.parse_install(line[len(b"%%>install:"):])
            ok = req.name.decode() not in self.installs
            self.installs.setdefault(req.name.decode(), req.priority)
            self.send(b"%%<install:" + str(req.priority).encode() + b":" + req.name + b":" + yr.yate_bool_text(ok))
        elif kind == "watch":
            self.send(line.replace(b"%%>", b"%%<", 1) + b":true")
        elif kind == "answer":
            for hid, (msg, fut) in list(self.waiting.items()):
                code, ret = yr.decode_answer(line, hid, msg)
                if code == -2:
                    del self.waiting[hid]
                    fut.set_result((ret, msg))
                    return
            self.stub.failures.append(f"unmatched answer {line[:200]!r}")
        elif kind in ("debug", "output"):
            pass
        else:
            self.stub.failures.append(f"unexpected line {line[:200]!r}")

    async def dispatch(self, name: str, params: dict[str, str], timeout: float = 5.0) -> tuple[bool, yr.WireMessage]:
        self._seq += 1
        hid = f"0x7f00{self._seq:04x}.{self._seq * 7919}".encode()
        msg = yr.WireMessage(name.encode(), b"", [(k.encode(), v.encode()) for k, v in params.items()])
        fut: asyncio.Future[tuple[bool, yr.WireMessage]] = asyncio.get_running_loop().create_future()
        self.waiting[hid] = (msg, fut)
        self.send(yr.encode_message_line(hid, int(time.time()), msg))
        return await asyncio.wait_for(fut, timeout)


class ListenerStub:
    """A minimal Yate ``[listener]`` with no ``role=`` (TCP or UNIX), checking every line."""

    def __init__(self) -> None:
        self.conns: list[StubConn] = []
        self.failures: list[str] = []
        self.server: Optional[asyncio.base_events.Server] = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = StubConn(self, reader, writer)
        self.conns.append(conn)
        await conn.run()

    async def start_tcp(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def start_unix(self, path: str) -> None:
        self.server = await asyncio.start_unix_server(self._accept, path)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in self.conns:
            c.writer.close()

    async def wait_conn(self, n: int, timeout: float = 5.0) -> StubConn:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while len(self.conns) < n:
            if loop.time() > end:
                raise asyncio.TimeoutError(f"no connection #{n}; failures={self.failures}")
            await asyncio.sleep(0.01)
        return self.conns[n - 1]


async def _wait_installed(conn: StubConn, names: tuple[str, ...], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not set(names) <= set(conn.installs):
        if loop.time() > end:
            raise asyncio.TimeoutError(f"installs so far: {conn.installs}; lines={conn.lines}")
        await asyncio.sleep(0.01)


async def _socket_scenario(tmp_path: Path, mode: str) -> None:
    stub = ListenerStub()
    sockdir = None
    if mode == "tcp":
        port = await stub.start_tcp()
        address = f"127.0.0.1:{port}"
    else:
        sock = tmp_path / "ext.sock"
        if len(str(sock)) > 100:  # AF_UNIX path limit
            sockdir = tempfile.mkdtemp(prefix="sg")
            sock = Path(sockdir) / "ext.sock"
        await stub.start_unix(str(sock))
        address = str(sock)
    conf = write_conf(tmp_path / "sipgen.conf", {},
                      {"mode": mode, "address": address, "reconnect_min": "0.05", "reconnect_max": "0.2"})
    proc = await asyncio.create_subprocess_exec(
        SCRIPT, conf, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, cwd=yate_cwd(tmp_path))
    try:
        for n in (1, 2, 3):
            conn = await stub.wait_conn(n)
            await _wait_installed(conn, CONSOLE_MESSAGES)
            assert conn.lines[0] == b"%%>connect:global", conn.lines[:3]
            first_install = min(i for i, ln in enumerate(conn.lines) if ln.startswith(b"%%>install:"))
            assert conn.lines.index(b"%%>setlocal:bufsize:65536") < first_install
            assert conn.setlocals["trackparam"] == b"sipgen"
            ok, msg = await conn.dispatch("engine.status", {"module": "sipgen"})
            assert ok and msg.retval.startswith(b"name=sipgen,type=misc;")
            # the listener drops the connection: the script reconnects and installs again
            conn.writer.close()
            await conn.closed.wait()
        assert proc.returncode is None
        assert stub.failures == []
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 3.0)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        await stub.close()
        if sockdir:
            shutil.rmtree(sockdir, ignore_errors=True)


def test_tcp_mode_connects_first_installs_and_reconnects_after_close(tmp_path: Path) -> None:
    run(lambda: _socket_scenario(tmp_path, "tcp"))


def test_unix_mode_connects_first_installs_and_reconnects_after_close(tmp_path: Path) -> None:
    run(lambda: _socket_scenario(tmp_path, "unix"))


# ==========================================================================
# Further behaviour found while writing the above
# ==========================================================================


def test_deadline_after_reload_to_shorter_timeout_still_answers_before_yates_timeout(tmp_path: Path) -> None:
    path = tmp_path / "sipgen.conf"
    conf = write_conf(path, {"extensions": EXT, "timeout": 10000, "answer_margin": 1000})

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            await fy.wait_installed("sip.slow")
            # one message in progress under the old (long) timeout
            old = asyncio.ensure_future(fy.dispatch("sip.slow", {"sleep": "30"}))
            await fy.wait_until(lambda: fy.queue_length == 1, 3.0, "old message delivered")
            write_conf(path, {"extensions": EXT, "timeout": 2000, "answer_margin": 500})
            r = await command(fy, "sipgen reload")
            assert r.handled
            await fy.wait_until(lambda: fy.settings["timeout"] == 2000, 3.0, "setlocal timeout 2000")
            t0 = loop.time()
            r = await fy.dispatch("sip.slow", {"sleep": "30"})
            elapsed = loop.time() - t0
            old.cancel()
            assert fy.timeouts == [], f"Yate timed the new message out after {elapsed:.2f}s"
            assert r.outcome == "answered" and r.handled and r.get("code") == "500"
            assert elapsed < 2.0
            assert fy.failures == []

    run(scenario)


def test_console_commands_still_work_while_sip_is_overloaded(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf", {"extensions": EXT, "max_in_progress": 5})

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            await fy.wait_installed("sip.slow")
            slow = [asyncio.ensure_future(fy.dispatch("sip.slow", {"sleep": "1.0"})) for _ in range(5)]
            await fy.wait_until(lambda: fy.queue_length == 5, 3.0, "5 in progress")
            await asyncio.sleep(0.05)
            shed = await fy.dispatch("sip.slow", {"sleep": "1.0"})
            assert shed.get("code") == "503"  # sip.* is shed, as it should be
            r = await command(fy, "sipgen stats")
            await asyncio.gather(*slow)
            assert r.answered and r.handled, r
            assert stats_of(r.retval).get("overload") == "1"
            assert fy.failures == []

    run(scenario)


def test_handler_setting_an_unsendable_param_still_gets_exactly_one_failure_answer(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf", {"extensions": EXT, "timeout": 2000, "answer_margin": 500})

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            await fy.wait_installed("sip.badparamsync")
            results = await asyncio.gather(fy.dispatch("sip.badparam", {"a": "1"}),
                                           fy.dispatch("sip.badparamsync", {"a": "1"}))
            for r in results:
                assert r.outcome == "answered", (r.name, r.outcome)
                assert r.handled and r.get("code") == "500"
                assert r.get("bad=name") is None
            assert fy.alive and fy.failures == []

    run(scenario)


def test_script_dispatches_get_answers_in_any_order_time_out_and_enqueue_gets_none(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "sipgen.conf", {"extensions": EXT})

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            async def pong(msg: YMessage) -> bool:
                n = int(msg["n"])
                # n=0 answers last among the answered ones; n=2 never within the 1 s timeout
                await asyncio.sleep({0: 0.3, 1: 0.05, 2: 3.0}[n])
                msg.set("pong", str(n))
                return True

            fy.on("test.ping", pong)
            await ready(fy)
            r = await command(fy, "sipgen ping")
            assert r.answered and r.handled
            lines = r.retval.split("\r\n")
            assert lines[0] == "n=0,handled=True,pong=0"
            assert lines[1] == "n=1,handled=True,pong=1"
            assert lines[2] == "n=2,error=DispatchTimeout"
            sent = [m for m in fy.sent_by_script if m.name == "test.ping"]
            assert len(sent) == 3 and len({m.id for m in sent}) == 3 and all(m.id for m in sent)
            fire = await fy.wait_sent("test.fire")
            assert fire.id == "" and fire.get("x") == "1"  # fire-and-forget: empty id
            st = await stats(fy)
            assert st.get("dispatch_timeout") == "1"
            assert fy.failures == []

    run(scenario)


def test_config_path_with_spaces_is_one_argument_and_relative_paths_follow_the_file(tmp_path: Path) -> None:
    d = tmp_path / "my yate conf"
    d.mkdir()
    conf = write_conf(d / "sip gen.conf", {"timeout": 4000})

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            assert fy.settings["timeout"] == 4000  # the file was read: argv[1] was not split
            assert fy.settings["restart"] is True
            assert fy.failures == []
        assert (d / "state" / "lifecycle.json").is_file()

    run(scenario)


def test_empty_argument_runs_with_defaults_and_says_so(tmp_path: Path) -> None:
    # extmodule.conf [scripts] with no value: argv[1] is "" (ref §1.1)
    async def scenario() -> None:
        async with FakeYate(SCRIPT, "", cwd=yate_cwd(tmp_path), script_name="sipgen") as fy:
            await ready(fy)
            r = await fy.dispatch("engine.status", {"module": "sipgen"})
            assert "state=running" in r.retval
            assert fy.settings["timeout"] == 10000 and fy.settings["restart"] is True
            assert debug_texts(fy, "no configuration file")
            assert fy.failures == []

    run(scenario)


def test_unknown_key_is_warned_in_yates_log_and_the_script_runs(tmp_path: Path) -> None:
    path = tmp_path / "sipgen.conf"
    conf = write_conf(path, {"timout": 4000})  # a typo: must not pass silently

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            await fy.wait_until(lambda: debug_texts(fy, "timout"), 3.0, "warning about 'timout'")
            (lvl, text), = debug_texts(fy, "timout")
            assert lvl <= 5 and str(path) in text  # shown at Yate's default level
            r = await fy.dispatch("engine.status", {"module": "sipgen"})
            assert "state=running" in r.retval
            assert fy.settings["timeout"] == 10000
            assert fy.failures == []

    run(scenario)


def test_broken_extension_is_reported_and_the_script_runs_without_it(tmp_path: Path) -> None:
    broken = str(HELPERS / "ext_broken.py")
    conf = write_conf(tmp_path / "sipgen.conf", {"extensions": f"{broken},{EXT}"})

    async def scenario() -> None:
        async with fake(tmp_path, conf) as fy:
            await ready(fy)
            await fy.wait_installed("sip.slow")  # the good extension still loaded
            await fy.wait_until(lambda: debug_texts(fy, "ext_broken"), 3.0, "report of ext_broken")
            (lvl, text), = debug_texts(fy, "ext_broken.py")
            assert lvl <= 5 and "refuses to load" in text
            r = await fy.dispatch("sip.slow", {"sleep": "0"})
            assert r.handled and r.get("slept") == "0.0"
            assert fy.alive and fy.failures == []

    run(scenario)


def test_unix_mode_retries_until_the_listener_appears(tmp_path: Path) -> None:
    async def scenario() -> None:
        sockdir = tempfile.mkdtemp(prefix="sg")
        sock = str(Path(sockdir) / "late.sock")
        conf = write_conf(tmp_path / "sipgen.conf", {},
                          {"mode": "unix", "address": sock, "reconnect_min": "0.05", "reconnect_max": "0.2"})
        proc = await asyncio.create_subprocess_exec(
            SCRIPT, conf, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, cwd=yate_cwd(tmp_path))
        stub = ListenerStub()
        try:
            await asyncio.sleep(0.5)  # nothing listens yet: the script keeps retrying
            assert proc.returncode is None
            await stub.start_unix(sock)
            conn = await stub.wait_conn(1, timeout=2.0)
            await _wait_installed(conn, CONSOLE_MESSAGES)
            assert conn.lines[0] == b"%%>connect:global"
            ok, msg = await conn.dispatch("engine.status", {"module": "sipgen"})
            assert ok and b"state=running" in msg.retval
            assert stub.failures == []
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 3.0)
            await stub.close()
            shutil.rmtree(sockdir, ignore_errors=True)

    run(scenario)
