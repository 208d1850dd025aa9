"""Shared harness for the SIP MESSAGE end-to-end tests (``test_e2e_message*.py``).

The real ``scripts/yate-sipgen`` runs as a subprocess behind :class:`fakeyate.FakeYate`, with
its config file and ``state_dir`` in ``tmp_path``. :class:`Yate` plays the Yate modules the
MESSAGE feature talks to:

* **regfile** on ``call.route`` (priority 100): a registered ``user@domain`` routes to its
  contact (``sip/<uri>`` plus ``oconnection_id`` when given), a known but unregistered one gets
  ``error=offline`` and ``false`` (what a live regfile does, reference §6), anyone else is left
  unhandled with no error (regfile's unknown user);
* **ysipchan** on ``xsip.generate`` (priority 110): records the request, removes every ``sip_*``
  and ``xsip_*`` param as Yate does with ``wait=true`` (reference §2.5) and answers with the code
  chosen by :attr:`Yate.xsip` (which may be async, wait on events, or return extra params).

``sip.message`` requests are built from :data:`BASE`: an authenticated MESSAGE from
``alice@example.com`` to ``bob@example.com`` with the params a live Yate 6.4.1 sends
(reference §2.2 and §6).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sqlite3
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

try:
    from fakeyate import FakeYate, YMessage
except ImportError:  # pragma: no cover - tests/ turned into a package
    from tests.fakeyate import FakeYate, YMessage  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "yate-sipgen")

#: An authenticated out-of-dialog MESSAGE alice@example.com -> bob@example.com, as Yate
#: dispatches it (``username`` twice, reference §6 item 4; header params lower-cased).
BASE: list[tuple[str, str]] = [
    ("called", "bob"), ("caller", "alice"), ("callername", "Alice A"), ("username", "alice"),
    ("realm", "Yate"), ("newcall", "false"), ("domain", "example.com"),
    ("device", "softphone/1.0"), ("connection_id", "general"), ("connection_reliable", "false"),
    ("username", "alice"), ("antiloop", "19"), ("ip_host", "192.0.2.7"), ("ip_port", "5080"),
    ("ip_transport", "UDP"), ("address", "192.0.2.7:5080"), ("sip_uri", "sip:bob@example.com"),
    ("sip_callid", "inbound-call-id@192.0.2.7"), ("xsip_dlgtag", "1342317711"),
    ("sip_from", '"Alice A" <sip:alice@example.com>;tag=inbound-from-tag'),
    ("sip_to", "<sip:bob@example.com>"), ("sip_contact", "<sip:alice@192.0.2.7:5080>"),
    ("sip_user-agent", "softphone/1.0"), ("sip_content-type", "text/plain;charset=UTF-8"),
    ("xsip_type", "text/plain"), ("xsip_body", "hello bob\r\n"),
]

DEFAULT_TYPES = ("text/plain, text/html, message/cpim, message/imdn+xml, "
                 "application/im-iscomposing+xml")

#: The only params our xsip.generate MESSAGE may carry (plus connection_id,
#: xsip_body_encoding, multipart parts and Auto-Submitted where they apply).
XSIP_KEYS = {"method", "uri", "wait", "antiloop", "sip_From", "sip_To", "sip_Call-ID",
             "sip_CSeq", "sip_Date", "xsip_type", "xsip_body"}

def write_conf(tmp_path: Path, message: Optional[dict[str, Any]] = None,
               general: Optional[dict[str, Any]] = None, name: str = "sipgen.conf") -> str:
    """A config in tmp_path: state in tmp_path/state, our domain example.com by default."""
    g = {"state_dir": "state"}
    g.update(general or {})
    m: dict[str, Any] = {"domains": "example.com"}
    m.update(message or {})
    lines = ["[general]"] + [f"{k}={v}" for k, v in g.items()]
    lines += ["", "[message]"] + [f"{k}={v}" for k, v in m.items()]
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(p)


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    """Run one async scenario with a hard upper bound."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(bounded())


def params_of(base: list[tuple[str, str]], drop: tuple[str, ...] = (),
              **over: Optional[str]) -> list[tuple[str, str]]:
    """BASE with some params replaced (every occurrence: ``username`` comes twice), removed
    (``None``) or added at the end.

    Keyword names use ``__`` for ``-`` (``sip_content__type``).
    """
    over = {k.replace("__", "-"): v for k, v in over.items()}
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for k, v in base:
        if k in drop:
            continue
        if k in over:
            if over[k] is None:
                continue
            v = over[k]  # every occurrence (username comes twice)
        seen.add(k)
        out.append((k, v))
    for k, v in over.items():
        if k not in seen and v is not None:
            out.append((k, v))
    return out


class Yate:
    """The fake Yate plus the modules the MESSAGE feature talks to (see module docstring)."""

    def __init__(self, fy: FakeYate) -> None:
        self.fy = fy
        self.registered: dict[str, str] = {}  # user@domain -> callto
        self.oconn: dict[str, str] = {}  # user@domain -> oconnection_id
        self.known: set[str] = {"bob@example.com", "carol@example.com", "dave@example.com",
                                "alice@example.com"}
        self.route_answer: Optional[Callable[[YMessage], Any]] = None  # overrides regfile
        self.xsip: Callable[[YMessage], Any] = lambda m: 200
        self.xsip_seen: list[YMessage] = []  # as dispatched by the script
        self.xsip_active = 0
        self.xsip_max_active = 0
        self.routes_seen: list[YMessage] = []
        fy.on("call.route", self._route, 100, track="regfile")
        fy.on("xsip.generate", self._xsip, 110, track="sip")

    # -- Yate modules ---------------------------------------------------------------------
    async def _route(self, m: YMessage) -> bool:
        self.routes_seen.append(m.copy())
        if self.route_answer is not None:
            r = self.route_answer(m)
            if inspect.isawaitable(r):
                r = await r
            return bool(r)
        # ours carries called_domain; Yate's own (native path) only the Request-URI
        domain = m.get("called_domain") or m.get("sip_uri", "").rpartition("@")[2].split(";")[0]
        key = f"{m.get('called', '')}@{domain}"
        if key in self.registered:
            m.retval = self.registered[key]
            if key in self.oconn:
                m.set("oconnection_id", self.oconn[key])
            m.set("driver", "sip")
            # regfile also copies the *caller's* section into the answer (reference §3.8)
            m.set("password", "secret-of-caller")
            return True
        if key in self.known:
            m.set("error", "offline")
            return False
        return False

    async def _xsip(self, m: YMessage) -> bool:
        if m.get("method") is None:
            return False
        self.xsip_seen.append(m.copy())
        self.xsip_active += 1
        self.xsip_max_active = max(self.xsip_max_active, self.xsip_active)
        try:
            r = self.xsip(m)
            if inspect.isawaitable(r):
                r = await r
        finally:
            self.xsip_active -= 1
        for k in {k for k, _ in m.params}:
            if k.startswith(("sip_", "xsip_")) or k in ("sip", "xsip"):
                m.clear(k)
        if r is None:
            return True
        if isinstance(r, dict):
            handled = r.pop("_handled", True)
            for k, v in r.items():
                m.set(k, str(v))
            return bool(handled)
        m.set("code", str(r))
        return True

    # -- helpers ------------------------------------------------------------------------------
    def register_contact(self, key: str, uri: str, oconnection_id: str = "") -> None:
        self.registered[key] = "sip/" + uri
        if oconnection_id:
            self.oconn[key] = oconnection_id

    def hold_xsip(self, code: int = 200, body: Optional[str] = None) -> asyncio.Event:
        """From now on the phone answers each xsip.generate ``code`` only once the returned
        event is set (never, if nobody sets it); with ``body``, only the one whose
        ``xsip_body`` is that (the others are answered at once)."""
        release = asyncio.Event()

        async def held(m: YMessage) -> int:
            if body is None or m.get("xsip_body") == body:
                await release.wait()
            return code

        self.xsip = held
        return release

    def unregister_contact(self, key: str) -> None:
        self.registered.pop(key, None)
        self.oconn.pop(key, None)

    async def message(self, base: list[tuple[str, str]] = BASE, drop: tuple[str, ...] = (),
                      **over: Optional[str]) -> YMessage:
        """Dispatch one sip.message (BASE with changes) and return Yate's final message."""
        return await self.fy.dispatch("sip.message", params_of(base, drop, **over))

    async def command(self, line: str) -> str:
        r = await self.fy.dispatch("engine.command", {"line": line})
        assert r.handled, r
        return r.retval

    async def status(self) -> dict[str, str]:
        """``status sipgen`` as a dict: main counters and the details."""
        r = await self.fy.dispatch("engine.status", {"module": "sipgen"})
        assert r.handled, r
        out: dict[str, str] = {}
        for part in r.retval.strip().split(";")[1:]:
            for kv in part.split(","):
                k, _, v = kv.partition("=")
                out[k] = v
        return out

    async def stored(self, who: str = "") -> list[str]:
        """Rows of ``sipgen messages [who]`` (empty list when none)."""
        text = await self.command("sipgen messages" + (f" {who}" if who else ""))
        if text.startswith("No stored messages"):
            return []
        return text.strip().split("\r\n")[1:]

    async def register(self, user: str, domain: str, contact: str, handled: bool = True,
                       oconnection_id: str = "", **extra: str) -> None:
        """A REGISTER as regfile saw it: the ``user.register`` watch notification (ref §6)."""
        self.register_contact(f"{user}@{domain}", contact, oconnection_id)
        params = [("number", user), ("sip_uri", f"sip:{domain}"), ("sip_callid", "reg-1@x"),
                  ("expires", "300"), ("username", user), ("driver", "sip"),
                  ("data", f"sip/{contact}"), ("sip_to", contact),
                  ("sip_contact", f"<{contact}>"), ("sip_expires", "300")]
        if oconnection_id:
            params += [("route_params", "oconnection_id"), ("oconnection_id", oconnection_id)]
        params += list(extra.items())
        params.append(("handlers", "regfile:100"))
        sent = await self.fy.watch_notify("user.register", params, handled=handled)
        assert sent, "the script does not watch user.register"

    def bodies(self) -> list[str]:
        return [m.get("xsip_body", "") for m in self.xsip_seen]

    async def wait_xsip(self, count: int, timeout: float = 5.0) -> list[YMessage]:
        await self.fy.wait_until(lambda: len(self.xsip_seen) >= count, timeout,
                                 f"{count} xsip.generate")
        return self.xsip_seen

    async def wait_store_empty(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while await self.stored():
            assert time.monotonic() < deadline, "stored messages left"
            await asyncio.sleep(0.02)

    async def settle(self) -> None:
        """A console round trip through the store's thread: work queued before it is done."""
        await self.stored()
        await asyncio.sleep(0.05)


async def store_ready(fy: FakeYate, timeout: float = 10.0) -> None:
    """Wait until the script opened its message store (``sipgen messages`` stops saying off)."""
    await fy.wait_installed("sip.message", timeout)
    deadline = time.monotonic() + timeout
    while True:
        r = await fy.dispatch("engine.command", {"line": "sipgen messages"})
        if r.handled and "store is off" not in r.retval:
            return
        assert time.monotonic() < deadline, r.retval
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def started(tmp_path: Path, message: Optional[dict[str, Any]] = None,
                  general: Optional[dict[str, Any]] = None, wait_store: bool = True,
                  before_start: Optional[Callable[[Yate], None]] = None,
                  **fake_kw: Any) -> AsyncIterator[Yate]:
    """Start the script with this config; ``before_start`` sets up the fake modules first
    (what they answer to the script's very first messages)."""
    conf = write_conf(tmp_path, message, general)
    cwd = tmp_path / "yate-cwd"
    cwd.mkdir(exist_ok=True)
    fy = FakeYate(SCRIPT, conf, cwd=str(cwd), script_name="sipgen", **fake_kw)
    y = Yate(fy)
    if before_start is not None:
        before_start(y)
    await fy.start()
    try:
        if wait_store and (message or {}).get("store", True) not in (False, "false"):
            await store_ready(fy)
        else:
            await fy.wait_installed("sip.message")
        yield y
    finally:
        await fy.stop()


def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "messages.db")


def db_rows(tmp_path: Path, where: str = "1", args: tuple = ()) -> list[sqlite3.Row]:
    """Rows of the message store, read from the test (WAL: a reader never blocks the script)."""
    con = sqlite3.connect(db_path(tmp_path), timeout=10)
    con.row_factory = sqlite3.Row
    try:
        return con.execute(f"SELECT * FROM messages WHERE {where} ORDER BY id", args).fetchall()
    finally:
        con.close()


def db_exec(tmp_path: Path, sql: str, args: tuple = ()) -> int:
    con = sqlite3.connect(db_path(tmp_path), timeout=10, isolation_level=None)
    try:
        return con.execute(sql, args).rowcount
    finally:
        con.close()


def sent(y: "Yate", name: str) -> list:
    """Messages named ``name`` the script emitted, exactly as it wrote them."""
    return [m for m in y.fy.sent_by_script if m.name == name]


def assert_clean(y: "Yate") -> None:
    """No protocol violation, handler error or timeout was seen by the fake Yate."""
    assert y.fy.failures == []
    assert y.fy.handler_errors == []
    assert y.fy.timeouts == []
