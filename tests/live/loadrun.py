#!/usr/bin/env python3
"""A real-Yate SIP MESSAGE load run: Yate's regexroute recipe against yate-sipgen.

For every *setup* x *Yate worker setting* x *recipient count* x *rate* ("a row") this starts a
fresh Yate (:class:`yatelive.LiveYate`, a new temporary directory, so nothing leaks between
rows: no registrations, no stored messages, no warmed-up worker threads), registers the
recipients so that all their Contacts point at ONE ``sipp`` UAS process, and lets a ``sipp`` UAC
send unauthenticated MESSAGEs (``text/plain``, a short body) at the rate for the duration,
round robin over the recipients (an injection CSV), retransmitting over UDP as a phone does
(Timer E) until a final answer or Timer F (32 s). The registrations are sent from the UAS's
port before sipp takes it, so ysipchan's NAT detection leaves the Contacts alone. Yate logs at
its default level (no ``-v``) so that writing the log does not dominate its CPU. Everything is
on 127.0.0.1.

Setups:

``recipe``
    Yate's documented regexroute MESSAGE recipe (``examples/regexroute-replaced.conf``,
    uncommented): regexroute ``[extra] sip.message=120, msg.execute=90``; ``[sip.message]``
    answers 415 for an empty type, logs the message, enqueues ``msg.execute`` to
    ``lateroute/${called}`` and answers 200; ``[msg.execute]`` renames the routed message to
    ``xsip.generate method=MESSAGE``. regexroute.yate and lateroute.yate are loaded, no script.
    (With unauthenticated senders ``${domain}`` is empty, so the recipe's forwarded MESSAGE
    has ``From: <sip:1000@>``; sipp does not mind.)
``sipgen``
    yate-sipgen in set-up (A) (``scripts/yate-sipgen`` from this checkout, as it is when the row
    starts) with ``[message] auth=optional``, ``domains=127.0.0.1`` and the per-sender rate
    limit opened (``sender_rate=sender_burst=100000``); everything else at its defaults
    (``mode=relay``: the sender's answer waits for the delivery's outcome;
    ``routing=registrations``: registered users are sent to without a ``call.route``; pass
    ``--sipgen-option message.routing=yate`` for Yate's routing on every MESSAGE).

Both: ysipchan ``[methods] message=no`` (MESSAGE handed over as ``sip.message`` without a
digest challenge: the senders are unauthenticated), ``[message] enable=no``,
``generate=true``, ``async_generic=true``, ``initial_headers=no`` (Yate's default).

Yate worker settings (yate.conf ``[general]``, read in engine/Engine.cpp):

``default``
    nothing set: ``minworkers=1``, ``maxworkers=10``, ``addworkers=1``. The engine starts with
    one message-dispatching thread and, once a second, adds ``addworkers`` more when none of
    them came back to the queue in the last second.
``tuned``
    ``minworkers=20``, ``maxworkers=250`` (examples/yate.conf).
``fast``
    ``tuned`` plus ``idlemsec=1`` (what ``--check`` prints and examples/yate.conf sets):
    Yate's polling interval, 5 ms by default, which a waiting ``xsip.generate``, the SIP
    endpoint's event loop and a thread waiting to write to a script all sleep for.

Figures of a row (see :class:`Row` for the exact meaning of each).

Run it (needs ``YATE_PREFIX`` and ``sipp`` on ``PATH``)::

    YATE_PREFIX=/work/yate/prefix .venv/bin/python tests/live/loadrun.py \\
        --rates 100,250,500 --duration 10 --recipients 50,1 [--json FILE] \\
        [--setups recipe,sipgen] [--yate-workers default|tuned|fast|default,fast] \\
        [--sipgen-option general.max_in_progress=200 ...] [--workdir DIR]

Figures depend on the machine and on whatever else runs on it: read them side by side within
one run, never against fixed numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from sipphone import Phone  # noqa: E402
from yatelive import PREFIX, ROOT, LiveYate, available, free_port  # noqa: E402

SETUPS = ("recipe", "sipgen")

#: yate.conf [general] per worker setting. Keys and defaults: engine/Engine.cpp
#: (s_minworkers=1, s_maxworkers=10, s_addworkers=1; "minworkers" 1..500, "maxworkers"
#: minworkers..1000, "addworkers" 1..10).
WORKERS: dict[str, dict[str, str]] = {
    "default": {},
    "tuned": {"minworkers": "20", "maxworkers": "250"},
    # and Yate's polling interval at its minimum (Thread::idleMsec, default 5 ms): a waiting
    # xsip.generate, the SIP endpoint's event loop and extmodule all poll at this interval
    "fast": {"minworkers": "20", "maxworkers": "250", "idlemsec": "1"},
}

#: Yate's regexroute MESSAGE recipe: the rule lines of examples/regexroute-replaced.conf,
#: uncommented (sections 1-3; the obsolete msg.route compatibility rule is left out).
RECIPE_REGEXROUTE = r"""[default]

[extra]
sip.message=120
msg.execute=90

[sip.message]
${xsip_type}^$=415
.*=echo Got SIP MESSAGE type '${xsip_type}' from '${username}': ${xsip_body}
.*=enqueue msg.execute;caller=${caller};called=${called};domain=${domain};callto=lateroute/${called};body_encoding=${xsip_body_encoding};type=${xsip_type};text=${xsip_body}
.*=200

[msg.execute]
${callto}^sip/\(sip:.*\)$=rename xsip.generate;method=MESSAGE;uri=\1;sip_From=<sip:${caller}@${domain}>;xsip_type=${type$text/plain};xsip_body_encoding=${body_encoding};xsip_body=${text}
"""

#: Final response codes the UAC scenario tells apart (anything else is sipp's "unexpected").
FINAL_CODES = (200, 202, 400, 401, 403, 404, 405, 407, 408, 413, 415, 420, 480, 481, 482,
               483, 484, 486, 488, 491, 500, 501, 502, 503, 504, 505, 513, 603)

#: The UAC gives up on a MESSAGE after this long without a final answer (RFC 3261 Timer F).
UAC_RECV_TIMEOUT_MS = 32000

#: Yate log lines worth counting: name -> regular expression.
LOG_PATTERNS: dict[str, str] = {
    "timeouts": r"did not return in",
    "unmatched": r"unmatched",
    "queue_full": r"already having \d+ queued",
    "new_workers": r"Creating new \d+ message dispatching threads",
    "congestion": r"[Cc]ongestion",
    "loopback": r"late routed back to itself",
    "flood": r"Flood detected|Severe flood",
    "sipgen_deadline": r"did not finish within",
    "sipgen_store_full": r"not storing for",
}

SENDER = "1000"
FIRST_USER = 2001


def recipe_lines_in_example() -> list[str]:
    """Rule lines of :data:`RECIPE_REGEXROUTE` missing (commented) from the example file."""
    example = (ROOT / "examples" / "regexroute-replaced.conf").read_text()
    wanted = [ln for ln in RECIPE_REGEXROUTE.splitlines()
              if ln and not ln.startswith("[default")]
    have = {ln[1:] for ln in example.splitlines() if ln.startswith(";")}
    return [ln for ln in wanted if ln not in have]


# -- sipp scenarios ---------------------------------------------------------------------------

def uac_scenario() -> str:
    """The sender: one MESSAGE per sipp call, to ``[field0]`` of the injection CSV.

    Each final answer writes one log line ``final;<code>;<call number>;<s0>;<u0>;<s1>;<u1>``:
    the time (gettimeofday, seconds and microseconds) just before the MESSAGE was sent and when
    its final answer was received. A 100 Trying is accepted and ignored. The MESSAGE is
    retransmitted as a phone does over UDP (RFC 3261 Timer E: after 0.5 s, doubling up to
    sipp's T2 of 4 s, until a final answer); sipp does not retransmit without ``retrans``.
    """
    logged = ('<action><gettimeofday assign_to="s1,u1"/>'
              '<log message="final;{code};[call_number];[$s0];[$u0];[$s1];[$u1]"/></action>')
    recvs = ['  <recv response="100" optional="true"/>']
    for i, code in enumerate(FINAL_CODES):
        optional = ' optional="true"' if i < len(FINAL_CODES) - 1 else ""
        recvs.append(f'  <recv response="{code}"{optional} next="done">'
                     f'{logged.format(code=code)}</recv>')
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="sipgen-load-uac">
  <nop><action><gettimeofday assign_to="s0,u0"/></action></nop>
  <send retrans="500">
    <![CDATA[
MESSAGE sip:[field0]@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
Max-Forwards: 70
From: <sip:{SENDER}@[remote_ip]:[remote_port]>;tag=[pid]l[call_number]
To: <sip:[field0]@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 MESSAGE
User-Agent: sipgen-loadrun
Content-Type: text/plain
Content-Length: [len]

load test [call_number]
    ]]>
  </send>
{chr(10).join(recvs)}
  <label id="done"/>
</scenario>
"""


def sipp_reply(status: str, *headers: str, to_tag: bool = True, body: str = "",
               retrans: int = 0) -> str:
    """A sipp ``<send>`` of a response to the last request: its Via, From, To (with our tag
    when ``to_tag``), Call-ID and CSeq, then ``headers`` and ``body``."""
    tag = ";tag=[pid]r[call_number]" if to_tag else ""
    length = "[len]" if body else "0"
    lines = ["[last_Via:]", "[last_From:]", f"[last_To:]{tag}", "[last_Call-ID:]",
             "[last_CSeq:]", *headers, f"Content-Length: {length}", ""] + ([body] if body else [])
    attr = f' retrans="{retrans}"' if retrans else ""
    text = "\n".join(lines)
    return f"""  <send{attr}>
    <![CDATA[
SIP/2.0 {status}
{text}
    ]]>
  </send>"""


def uas_scenario(linger_ms: int = 1000) -> str:
    """The recipients' phone: answers each MESSAGE 200 and logs one line per MESSAGE,
    ``got;sip:<user>;<Call-ID>;load test <n>`` (``n``: the UAC's call number, from the body).

    The call lingers ``linger_ms`` after the answer so that a retransmission of the MESSAGE is
    answered again by sipp (counted in its Retransmissions) instead of being a new call.
    """
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="sipgen-load-uas">
  <recv request="MESSAGE">
    <action>
      <ereg regexp="sip:[^@;> ]+" search_in="msg" check_it="false" assign_to="ruri"/>
      <ereg regexp="load test [0-9]+" search_in="body" check_it="false" assign_to="text"/>
      <log message="got;[$ruri];[call_id];[$text]"/>
    </action>
  </recv>
{sipp_reply("200 OK")}
  <timewait milliseconds="{linger_ms}"/>
</scenario>
"""


# -- measuring --------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: Optional[int]) -> Optional[float]:
    """utime + stime of a process (all its threads), in seconds; None if it is gone."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def udp_rcvbuf_errors() -> Optional[int]:
    """The kernel's count of UDP datagrams dropped for a full receive buffer (all sockets)."""
    try:
        with open("/proc/net/snmp") as f:
            rows = [ln.split() for ln in f if ln.startswith("Udp:")]
        return int(rows[1][rows[0].index("RcvbufErrors")])
    except (OSError, IndexError, ValueError):
        return None


def percentile(values: list[float], pct: float) -> Optional[float]:
    """Nearest-rank percentile (``pct`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(1, -(-len(s) * pct // 100))  # ceil
    return s[int(k) - 1]


def sipp_stat(path: Path) -> dict[str, str]:
    """The last row of a sipp ``-trace_stat`` CSV as a dict (column name -> value)."""
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return {}
    if len(lines) < 2:
        return {}
    head = lines[0].split(";")
    return dict(zip(head, lines[-1].split(";")))


def stat_int(stat: dict[str, str], name: str) -> int:
    try:
        return int(float(stat.get(name, "0") or 0))
    except ValueError:
        return 0


@dataclass
class Row:
    """One row of the table: one setup, worker setting, recipient count and rate.

    At the sender (the sipp UAC):

    ``sent``        MESSAGEs the UAC sent (sipp's OutgoingCall count: ``rate * duration``).
    ``send_s``      seconds from the first MESSAGE sent to the last (≈ duration when sipp kept
                    the rate).
    ``codes``       final answers by code (``ok`` is ``codes[200]``), one per MESSAGE: a call
                    ends at its first final answer.
    ``no_answer``   MESSAGEs without a final answer within Timer F (32 s), or answered with a
                    code the scenario does not list (``uac_unexpected``).
    ``p50_ms``/``p99_ms``/``max_ms``  response time: sending the MESSAGE to receiving its final
                    answer, in ms, nearest-rank percentiles over the answered MESSAGEs.
    ``uac_retransmissions``  sipp's Retransmissions counter at the UAC (MESSAGEs it sent
                    again for want of an answer, Timer E, and responses it got twice).
    ``udp_drops``   UDP datagrams the kernel dropped for a full receive buffer during the row
                    (/proc/net/snmp RcvbufErrors, all sockets on the machine: Yate's SIP socket
                    overflows when ysipchan's flood protection stops reading it).

    At the recipients (the one sipp UAS all Contacts point at):

    ``delivered``   distinct MESSAGEs (by the body's number) that reached the UAS.
    ``delivered_twice``  of those, how many reached it in more than one SIP transaction
                    (different Call-IDs: the same text sent twice).
    ``uas_repeats`` a transaction seen again after the UAS stopped absorbing its
                    retransmissions (same Call-ID as a new call; not a second message).
    ``per_recipient_min``/``max``  distinct MESSAGEs per recipient (round robin: equal).

    Truthfulness, by the UAC's call number carried in the body:

    ``ok_not_delivered``  answered 200 but never reached the UAS.
    ``delivered_not_ok``  reached the UAS although the sender's answer was not 200, by that
                    answer's code (e.g. a 500 for a message delivered after all).

    Cost, over the sending window (``send_window_s``: from starting the UAC until ``duration``
    later or its exit if sooner), as a percentage of one core (user + system time from
    /proc/PID/stat; above 100 means more than one core):

    ``yate_cpu``    the Yate process, all its threads.
    ``script_cpu``  yate-sipgen (None for the recipe: no script).
    ``*_cpu_all``   the same over ``window_s``: from starting the UAC to its exit (sending plus
                    waiting for the last answers). ``uac_cpu``/``uas_cpu``: the sipp processes
                    over ``window_s`` (they share the machine with Yate).

    Yate's log:

    ``timeouts``    lines "did not return in" (a message extmodule gave up waiting for the
                    script's answer). ``log_counts`` counts every :data:`LOG_PATTERNS` entry,
                    ``log_samples`` holds the first lines of each; ``engine`` is Yate's
                    ``status engine`` after the row (e.g. ``workers``, ``maxqueue``: the longest
                    engine queue seen, ``messageage``).
    """

    setup: str
    workers: str
    recipients: int
    rate: int
    duration: float
    sent: int = 0
    send_s: float = 0.0
    codes: dict[int, int] = field(default_factory=dict)
    no_answer: int = 0
    answered_twice: int = 0
    p50_ms: Optional[float] = None
    p99_ms: Optional[float] = None
    max_ms: Optional[float] = None
    uac_retransmissions: int = 0
    uac_out_of_call: int = 0
    uac_unexpected: int = 0
    udp_drops: Optional[int] = None
    delivered: int = 0
    delivered_twice: int = 0
    uas_repeats: int = 0
    uas_retransmissions: int = 0
    per_recipient_min: int = 0
    per_recipient_max: int = 0
    ok_not_delivered: int = 0
    delivered_not_ok: dict[int, int] = field(default_factory=dict)
    send_window_s: float = 0.0
    window_s: float = 0.0
    yate_cpu: Optional[float] = None
    script_cpu: Optional[float] = None
    yate_cpu_all: Optional[float] = None
    script_cpu_all: Optional[float] = None
    uac_cpu: Optional[float] = None
    uas_cpu: Optional[float] = None
    timeouts: int = 0
    log_counts: dict[str, int] = field(default_factory=dict)
    log_samples: dict[str, list[str]] = field(default_factory=dict)
    engine: dict[str, str] = field(default_factory=dict)
    sipgen_stats: str = ""
    registered: int = 0
    script_restarted: bool = False
    loadavg_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    code: str = ""
    commands: dict[str, str] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> int:
        return self.codes.get(200, 0)

    @property
    def answered(self) -> int:
        return sum(self.codes.values())

    def as_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["codes"] = {str(k): v for k, v in sorted(self.codes.items())}
        d["delivered_not_ok"] = {str(k): v for k, v in sorted(self.delivered_not_ok.items())}
        d["ok"] = self.ok
        return d


# -- one row ----------------------------------------------------------------------------------

def yate_overrides(setup: str, workers: str, users: dict[str, str],
                   sipgen_extra: Optional[dict[str, dict[str, str]]] = None) -> dict[str, Any]:
    """LiveYate constructor arguments for a setup and worker setting.

    ``sipgen_extra`` (section -> key -> value) is merged into sipgen.conf (sipgen rows only).
    """
    ysip = {"general": {"initial_headers": "no"}, "methods": {"message": "no"},
            "message": {"enable": "no"}}
    kw: dict[str, Any] = {"ysipchan": ysip, "users": users,
                          "yate": {"general": dict(WORKERS[workers])}}
    if setup == "recipe":
        kw.update(modules=("regexroute.yate", "lateroute.yate"),
                  extmodule={"scripts": None}, regexroute=RECIPE_REGEXROUTE)
    elif setup == "sipgen":
        conf = {"message": {"auth": "optional", "domains": "127.0.0.1",
                            "sender_rate": "100000", "sender_burst": "100000"}}
        for sect, keys in (sipgen_extra or {}).items():
            conf.setdefault(sect, {}).update(keys)
        kw["sipgen"] = conf
    else:
        raise ValueError(f"unknown setup {setup!r}")
    return kw


async def register_all(y: LiveYate, users: dict[str, str], port: int) -> int:
    """REGISTER every user from 127.0.0.1:``port`` with Contact ``<sip:user@127.0.0.1:port>``.

    Sent from the port the sipp UAS will then listen on, so ysipchan's NAT detection (source
    port != Contact port) leaves the Contact alone. Returns how many got 200.
    """
    ok = 0
    phone = await Phone("", "", y.server, port=port).start()
    try:
        for user, password in users.items():
            # one socket, one phone playing each user in turn (own Call-ID per user)
            phone.user, phone.password = user, password
            phone.call_id = f"reg-{user}-{time.monotonic_ns()}@127.0.0.1"
            resp = await phone.register(expires=3600)
            ok += resp.code == 200
    finally:
        phone.close()
        await asyncio.sleep(0.05)  # let the transport really release the port
    return ok


def _wait_file(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size > 0:
            return True
        time.sleep(0.02)
    return False


def _stop(proc: Optional[subprocess.Popen], timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _udp_send(port: int, data: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(data, ("127.0.0.1", port))


def scan_log(text: str, samples: int = 3) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Counts and first lines of :data:`LOG_PATTERNS` in Yate's log text."""
    counts = {k: 0 for k in LOG_PATTERNS}
    found: dict[str, list[str]] = {k: [] for k in LOG_PATTERNS}
    rx = {k: re.compile(v) for k, v in LOG_PATTERNS.items()}
    for line in text.splitlines():
        for k, r in rx.items():
            if r.search(line):
                counts[k] += 1
                if len(found[k]) < samples:
                    found[k].append(line[:300])
    return counts, {k: v for k, v in found.items() if v}


def sipp_commands(sipp: str, yate_port: int, uas_port: int, uas_cp: int, uac_port: int,
                  uac_cp: int, rate: int, total: int) -> tuple[list[str], list[str]]:
    """The sipp UAS and UAC command lines (run in the row's directory)."""
    common = ["-i", "127.0.0.1", "-nostdin", "-trace_logs", "-trace_stat", "-fd", "1",
              "-buff_size", "4194304"]
    uas = [sipp, "-sf", "uas.xml", "-p", str(uas_port), "-cp", str(uas_cp), *common,
           "-log_file", "uas.log", "-stf", "uas_stat.csv"]
    uac = [sipp, f"127.0.0.1:{yate_port}", "-sf", "uac.xml", "-p", str(uac_port),
           "-cp", str(uac_cp), *common, "-log_file", "uac.log", "-stf", "uac_stat.csv",
           "-inf", "users.csv", "-r", str(rate), "-rp", "1000", "-m", str(total),
           "-l", str(total), "-recv_timeout", str(UAC_RECV_TIMEOUT_MS)]
    return uas, uac


class CpuMeter:
    """CPU seconds of named processes at named moments (see :func:`cpu_seconds`)."""

    def __init__(self, pids: dict[str, Optional[int]]) -> None:
        self.pids = dict(pids)
        self.marks: dict[str, tuple[float, dict[str, Optional[float]]]] = {}
        self._last: dict[str, float] = {}

    def read(self) -> dict[str, Optional[float]]:
        out = {}
        for name, pid in self.pids.items():
            v = cpu_seconds(pid)
            if v is None and name in self._last:
                v = self._last[name]  # exited meanwhile: its last reading
            elif v is not None:
                self._last[name] = v
            out[name] = v
        return out

    def mark(self, label: str) -> None:
        self.marks[label] = (time.monotonic(), self.read())

    def percent(self, name: str, start: str, end: str) -> Optional[float]:
        """CPU of ``name`` between two marks, in % of one core; None if unknown."""
        (t0, a), (t1, b) = self.marks[start], self.marks[end]
        if a.get(name) is None or b.get(name) is None or t1 <= t0:
            return None
        return round(100.0 * (b[name] - a[name]) / (t1 - t0), 1)

    def seconds(self, start: str, end: str) -> float:
        return round(self.marks[end][0] - self.marks[start][0], 3)


def _wait_uas_quiet(stat: Path, quiet: float = 2.0, limit: float = 30.0) -> None:
    """Until the UAS's MESSAGE count has not moved for ``quiet`` seconds (its stat file is
    rewritten every second): the recipe answers before it delivers, so deliveries may still
    be under way when the UAC is done."""
    last, still = -1, time.monotonic()
    stop_at = time.monotonic() + limit
    while time.monotonic() < stop_at:
        n = stat_int(sipp_stat(stat), "IncomingCall(C)")
        if n != last:
            last, still = n, time.monotonic()
        elif time.monotonic() - still >= quiet:
            return
        time.sleep(0.25)


def run_row(setup: str, workers: str, recipients: int, rate: int, duration: float,
            workdir: Path, *, sipp: str = "sipp", verbosity: str = "",
            sipgen_extra: Optional[dict[str, dict[str, str]]] = None, log: Any = None) -> Row:
    """Run one row in ``workdir`` (created; a fresh Yate) and return its figures.

    A row that could not be run has ``error`` set; the others are still measured.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    row = Row(setup, workers, recipients, rate, duration)
    row.loadavg_before = os.getloadavg()
    row.code = code_version()
    users = {str(FIRST_USER + i): f"pw{FIRST_USER + i}" for i in range(recipients)}
    y = LiveYate(workdir / "yate", **yate_overrides(setup, workers, users, sipgen_extra))
    uas: Optional[subprocess.Popen] = None
    uac: Optional[subprocess.Popen] = None
    total = int(rate * duration)
    errors: list[str] = []
    with open(workdir / "sipp.out", "wb") as out:
        try:
            y.start(wait_installed="sip.message" if setup == "sipgen" else None,
                    verbosity=verbosity)
            uas_port, uas_cp, uac_port, uac_cp = (free_port() for _ in range(4))
            row.registered = asyncio.run(asyncio.wait_for(
                register_all(y, users, uas_port), 60))
            if row.registered != recipients:
                errors.append(f"only {row.registered} of {recipients} registrations got 200")
            (workdir / "uac.xml").write_text(uac_scenario())
            (workdir / "uas.xml").write_text(uas_scenario())
            (workdir / "users.csv").write_text("SEQUENTIAL\n"
                                               + "".join(f"{u}\n" for u in users))
            uas_cmd, uac_cmd = sipp_commands(sipp, y.sip_port, uas_port, uas_cp, uac_port,
                                             uac_cp, rate, total)
            row.commands = {"uas": " ".join(uas_cmd), "uac": " ".join(uac_cmd),
                            "yate_conf": str(y.conf)}
            uas = subprocess.Popen(uas_cmd, cwd=workdir, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=out, start_new_session=True)
            if not _wait_file(workdir / "uas_stat.csv", 10):
                raise RuntimeError("the sipp UAS did not start: " + (
                    workdir / "sipp.out").read_text(errors="replace")[-2000:])
            script = (y.script_pids() or [None])[0] if setup == "sipgen" else None
            meter = CpuMeter({"yate": y.proc.pid, "script": script, "uas": uas.pid})
            meter.mark("start")
            drops0 = udp_rcvbuf_errors()
            uac = subprocess.Popen(uac_cmd, cwd=workdir, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=out, start_new_session=True)
            meter.pids["uac"] = uac.pid
            t0 = time.monotonic()
            give_up = t0 + duration + UAC_RECV_TIMEOUT_MS / 1000 + 30
            while uac.poll() is None and time.monotonic() < give_up:
                meter.read()  # keeps the UAC's last reading before it exits
                if "sent" not in meter.marks and time.monotonic() >= t0 + duration:
                    meter.mark("sent")
                time.sleep(0.05)
            if uac.poll() is None:
                errors.append("the UAC did not finish")
                _stop(uac)
            meter.mark("end")
            if "sent" not in meter.marks:
                meter.marks["sent"] = meter.marks["end"]
            row.send_window_s = meter.seconds("start", "sent")
            row.window_s = meter.seconds("start", "end")
            row.yate_cpu = meter.percent("yate", "start", "sent")
            row.script_cpu = meter.percent("script", "start", "sent")
            row.yate_cpu_all = meter.percent("yate", "start", "end")
            row.script_cpu_all = meter.percent("script", "start", "end")
            row.uas_cpu = meter.percent("uas", "start", "end")
            row.uac_cpu = meter.percent("uac", "start", "end")
            if setup == "sipgen":
                row.script_restarted = y.script_pids() != [script]
            _wait_uas_quiet(workdir / "uas_stat.csv")
            drops1 = udp_rcvbuf_errors()
            if drops0 is not None and drops1 is not None:
                row.udp_drops = drops1 - drops0
            _udp_send(uas_cp, b"q")  # soft quit: lingering calls end, final stats written
            try:
                uas.wait(15)
            except subprocess.TimeoutExpired:
                _stop(uas)
            if not y.running:  # say so, rather than fail to reach its console
                code = y.proc.returncode  # type: ignore[union-attr]
                raise RuntimeError(f"Yate itself exited during the row ({code}; a negative "
                                   "code is the signal, see dmesg for a segfault)")
            row.engine = parse_status(y.command("status engine"))
            if setup == "sipgen":
                row.sipgen_stats = y.command("sipgen stats").strip()
            collect(row, workdir)
            row.log_counts, row.log_samples = scan_log(y.log_text())
            row.timeouts = row.log_counts["timeouts"]
            y.stop()
        except Exception as e:  # noqa: BLE001 - a failed row is reported, the run goes on
            errors.append(f"{type(e).__name__}: {e}")
            if log is not None:
                print(f"row {setup}/{workers}/{recipients}/{rate}: {errors[-1]}", file=log,
                      flush=True)
        finally:
            _stop(uac)
            _stop(uas)
            y.kill()
    row.error = "; ".join(errors)
    return row


def parse_status(text: str) -> dict[str, str]:
    """``key=value`` pairs of a Yate ``status`` line (``name=engine,...;plugins=5,...``)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "name=" not in line:
            continue
        for part in re.split(r"[,;]", line.strip()):
            k, eq, v = part.partition("=")
            if eq and k and k not in out:
                out[k] = v
    return out


def collect(row: Row, workdir: Path) -> None:
    """Fill ``row`` from the sipp logs and statistics in ``workdir``."""
    uac_stat = sipp_stat(workdir / "uac_stat.csv")
    uas_stat = sipp_stat(workdir / "uas_stat.csv")
    row.sent = stat_int(uac_stat, "OutgoingCall(C)")
    row.uac_retransmissions = stat_int(uac_stat, "Retransmissions(C)")
    row.uac_out_of_call = stat_int(uac_stat, "OutOfCallMsgs(C)")
    row.uac_unexpected = stat_int(uac_stat, "FailedUnexpectedMessage(C)")
    row.uas_retransmissions = stat_int(uas_stat, "Retransmissions(C)")
    codes: dict[int, int] = {}
    answer: dict[str, int] = {}  # UAC call number -> final code
    rtts: list[float] = []
    sends: list[float] = []
    for line in _read_lines(workdir / "uac.log"):
        parts = line.split(";")
        if len(parts) != 7 or parts[0] != "final":
            continue
        try:
            code, call = int(parts[1]), parts[2]
            s0, u0, s1, u1 = (float(x) for x in parts[3:])
        except ValueError:  # a line cut short when sipp was stopped: no answer logged
            continue
        codes[code] = codes.get(code, 0) + 1
        if call in answer:
            row.answered_twice += 1
        answer[call] = code
        start = s0 + u0 / 1e6
        sends.append(start)
        rtts.append((s1 + u1 / 1e6 - start) * 1000.0)
    row.codes = codes
    row.no_answer = max(row.sent - len(answer), 0)
    row.send_s = round(max(sends) - min(sends), 3) if sends else 0.0
    for name, pct in (("p50_ms", 50), ("p99_ms", 99), ("max_ms", 100)):
        v = percentile(rtts, pct)
        setattr(row, name, None if v is None else round(v, 2))
    seen_callids: set[str] = set()
    transactions: dict[str, set[str]] = {}  # message number -> Call-IDs it arrived in
    per_user: dict[str, set[str]] = {}
    for line in _read_lines(workdir / "uas.log"):
        parts = line.split(";")
        if len(parts) != 4 or parts[0] != "got":
            continue
        ruri, callid, text = parts[1], parts[2], parts[3]
        if callid in seen_callids:
            row.uas_repeats += 1
            continue
        seen_callids.add(callid)
        number = text.rsplit(" ", 1)[-1]
        transactions.setdefault(number, set()).add(callid)
        per_user.setdefault(ruri, set()).add(number)
    row.delivered = len(transactions)
    row.delivered_twice = sum(1 for ids in transactions.values() if len(ids) > 1)
    counts = [len(per_user.get(f"sip:{FIRST_USER + i}", ())) for i in range(row.recipients)]
    row.per_recipient_min, row.per_recipient_max = (min(counts), max(counts)) if counts else (0, 0)
    row.ok_not_delivered = sum(1 for c, code in answer.items()
                               if code == 200 and c not in transactions)
    lied: dict[int, int] = {}
    for number in transactions:
        code = answer.get(number, 0)  # 0: delivered, but the sender got no final answer
        if code != 200:
            lied[code] = lied.get(code, 0) + 1
    row.delivered_not_ok = lied


def _read_lines(path: Path) -> Iterable[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


# -- the whole run ----------------------------------------------------------------------------

def plan(setups: Iterable[str], workers: Iterable[str], recipients: Iterable[int],
         rates: Iterable[int]) -> list[tuple[str, str, int, int]]:
    """Every row to run, in table order (setup, workers, recipients, rate)."""
    return [(s, w, n, r) for n in recipients for s in setups for w in workers for r in rates]


def run_all(rows: list[tuple[str, str, int, int]], duration: float, *,
            workdir: Optional[Path] = None, verbosity: str = "", sipp: str = "sipp",
            keep: bool = False, sipgen_extra: Optional[dict[str, dict[str, str]]] = None,
            log: Any = sys.stderr) -> list[Row]:
    """Run ``rows`` one after the other; each in its own subdirectory of ``workdir``."""
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="sipgen-load-"))
    out: list[Row] = []
    try:
        for i, (setup, workers, n, rate) in enumerate(rows, 1):
            print(f"[{i}/{len(rows)}] {setup} workers={workers} recipients={n} rate={rate}/s "
                  f"for {duration:g} s", file=log, flush=True)
            r = run_row(setup, workers, n, rate, duration,
                        base / f"{i:02d}-{setup}-{workers}-{n}-{rate}", sipp=sipp,
                        verbosity=verbosity, sipgen_extra=sipgen_extra, log=log)
            print("    " + table([r]).splitlines()[-1], file=log, flush=True)
            out.append(r)
    finally:
        if not keep and not workdir:
            shutil.rmtree(base, ignore_errors=True)
        elif log is not None:
            print(f"work files kept in {base}", file=log)
    return out


def _fmt(v: Optional[float], unit: str = "") -> str:
    return "-" if v is None else f"{v:g}{unit}"


def table(rows: list[Row]) -> str:
    """The markdown table of ``rows`` (see :class:`Row` for what each figure means).

    "delivered, not 200" is :attr:`Row.delivered_not_ok` summed: messages that reached a
    recipient although the sender was told something else.
    """
    head = ("| setup | workers | recipients | rate | sent | delivered | 200 | other codes "
            "| no answer | delivered, not 200 | p50 ms | p99 ms | Yate CPU | script CPU "
            "| timeouts |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        other = ", ".join(f"{c}: {n}" for c, n in sorted(r.codes.items()) if c != 200) or "-"
        if r.error:
            other += f" (error: {r.error})"
        lines.append(
            f"| {r.setup} | {r.workers} | {r.recipients} | {r.rate} | {r.sent} | {r.delivered} "
            f"| {r.ok} | {other} | {r.no_answer} | {sum(r.delivered_not_ok.values())} "
            f"| {_fmt(r.p50_ms)} | {_fmt(r.p99_ms)} "
            f"| {_fmt(r.yate_cpu, '%')} | {_fmt(r.script_cpu, '%')} | {r.timeouts} |")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _option(text: str) -> tuple[str, str, str]:
    name, eq, value = text.partition("=")
    sect, dot, key = name.partition(".")
    if not (eq and dot and sect and key):
        raise argparse.ArgumentTypeError(f"expected SECTION.KEY=VALUE, got {text!r}")
    return sect.strip(), key.strip(), value.strip()


def _names(text: str, allowed: Iterable[str], what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{what}: {', '.join(bad) or 'none'} "
                                         f"(choose from {', '.join(allowed)})")
    return names


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description="Real-Yate MESSAGE load run: the regexroute recipe against yate-sipgen.",
        epilog="Needs YATE_PREFIX (a Yate build) and sipp. Sends only to 127.0.0.1.")
    ap.add_argument("--rates", default="100,250,500", type=_ints,
                    help="MESSAGEs per second, comma-separated (default 100,250,500)")
    ap.add_argument("--duration", default=10.0, type=float,
                    help="seconds of sending per row (default 10)")
    ap.add_argument("--recipients", default="50,1", type=_ints,
                    help="recipient counts, comma-separated (default 50,1)")
    ap.add_argument("--setups", default="recipe,sipgen",
                    type=lambda t: _names(t, SETUPS, "setups"),
                    help="recipe, sipgen or both (default recipe,sipgen)")
    ap.add_argument("--yate-workers", default="default",
                    type=lambda t: _names(t, WORKERS, "yate-workers"),
                    help="default, tuned or default,tuned (default: default)")
    ap.add_argument("--verbosity", default="",
                    help="Yate's -v option for the rows, e.g. --verbosity=-v (default: "
                         "none, Yate's level 7)")
    ap.add_argument("--sipgen-option", action="append", default=[], type=_option,
                    metavar="SECTION.KEY=VALUE",
                    help="set a sipgen.conf key for the sipgen rows (repeatable), e.g. "
                         "general.max_in_progress=300")
    ap.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    ap.add_argument("--workdir", help="keep each row's files (configs, logs) here")
    ap.add_argument("--sipp", default=shutil.which("sipp") or "sipp",
                    help="the sipp binary (default: sipp on PATH)")
    args = ap.parse_args(argv)
    why = available()
    if why:
        ap.error(why)
    if not shutil.which(args.sipp):
        ap.error(f"sipp not found ({args.sipp})")
    missing = recipe_lines_in_example()
    if missing:
        print(f"note: recipe lines not in examples/regexroute-replaced.conf: {missing}",
              file=sys.stderr)
    rows = plan(args.setups, args.yate_workers, args.recipients, args.rates)
    code_at_start = code_version()
    extra: dict[str, dict[str, str]] = {}
    for sect, key, value in args.sipgen_option:
        extra.setdefault(sect, {})[key] = value
    t0 = time.time()
    result = run_all(rows, args.duration, workdir=Path(args.workdir) if args.workdir else None,
                     verbosity=args.verbosity, sipp=args.sipp, keep=bool(args.workdir),
                     sipgen_extra=extra)
    print(table(result))
    if args.json:
        meta = {"started": t0, "argv": sys.argv, "yate_prefix": PREFIX,
                "duration": args.duration, "verbosity": args.verbosity, "sipgen_extra": extra,
                "code_at_start": code_at_start, "code_at_end": code_version(),
                "cpus": os.cpu_count()}
        Path(args.json).write_text(json.dumps(
            {"meta": meta, "rows": [r.as_json() for r in result]}, indent=1))
    return 1 if any(r.error for r in result) else 0


def code_version() -> str:
    """The checkout's HEAD, with ``+dirty`` when yate_sipgen/ or scripts/ have changes: the
    code a row ran (the script is started from the work tree when the row starts)."""
    head = _git("rev-parse", "--short", "HEAD")
    return head + ("+dirty" if _git("status", "--porcelain", "--", "yate_sipgen", "scripts")
                   else "")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


if __name__ == "__main__":
    sys.exit(main())
