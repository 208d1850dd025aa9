"""FakeYate: the Yate side of an extmodule pipe, for tests (asyncio, stdlib only).

Written from ``/work/shared/reference/yate-internals.md`` ("ref §N"); the live
observations of ref §6 win over the rest.  The wire rules themselves live in
:mod:`yate_rules` (an independent implementation: nothing here imports
``yate_sipgen``).

What is emulated
----------------
* **Spawning** (ref §1.1): ``execl(path, path, arg)`` -- argv is exactly
  ``[path, arg]``, one argument, ``""`` when none; no PATH search (the file
  needs its exec bit and a shebang); stdin/stdout are pipes; environment and
  cwd are inherited unless given; in the child SIGINT/SIGQUIT are ignored,
  SIGTERM/SIGHUP default, SIGPIPE ignored; fds >= 3 are closed.  stderr is
  captured into :attr:`FakeYate.stderr` (Yate would let it go to its console).
* **Reading** (ref §1.2, §6): Yate's reader loop with a ``bufsize`` buffer --
  a line (with its ``\\r``) over ``bufsize-2`` bytes overflows: stdin is
  closed at once and SIGTERM follows 30 ms later; a NUL also ends a line;
  one trailing ``\\r`` is stripped; empty lines are ignored; shrinking
  ``bufsize`` below the data already buffered closes the connection; an
  unterminated last line is lost at EOF.  stdout is read at all times, even
  while replies are waiting to be written.
* **Keywords** (ref §1.4), replies byte-exact: ``%%<install``,
  ``%%<uninstall``, ``%%<watch``, ``%%<unwatch``, ``%%<setlocal`` (all names
  of ref §1.4.7 with their clamping/ok rules), ``%%<quit`` then stdin closed,
  ``Error in: <line>`` for unparseable lines, ``%%>output`` / ``%%>debug``
  recorded.
* **Yate → script messages** (:meth:`FakeYate.dispatch`, ref §1.4.1, §1.5):
  only to installed names whose filter matches (param equal to the value,
  missing param == ""), with a Yate-style id and the tracking param;
  ``maxqueue`` refusal; waiting up to the script's *current* ``timeout``;
  partial application of malformed answers and, on timeout, the processed
  flag parsed before the error (ref §6 item 1); ``timebomb``.
* **Script → Yate messages** (ref §1.4.3): dispatched through the fake's
  handlers (:meth:`FakeYate.on`) and the script's own relays (only with
  ``reenter`` or an empty id), then watchers, then -- if the id was
  non-empty -- the answer line with Yate's encoding (``=`` in param names
  sent as ``%}``).  The watch line comes before the answer (Surprise 24).
* **Watches** (ref §1.4.6): post-dispatch notifications with an empty id for
  every message the fake dispatches, filtered by name or wildcard, honouring
  ``selfwatch``; :meth:`FakeYate.watch_notify` for arbitrary ones.
* **Lifecycle** (ref §1.6): EOF → flush (waiting messages return their
  current processed flag, relays and watches go away) → stdin closed → 30 ms
  → SIGTERM if alive → respawn at once with the same argument when
  ``setlocal restart:true`` (even after ``%%>quit``).

Protocol violations of the script end up in :attr:`FakeYate.failures`.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional, Union

try:  # works both as ``tests.fakeyate`` and as top-level ``fakeyate``
    from . import yate_rules as yr  # type: ignore[no-redef]
except ImportError:  # pragma: no cover - depends on how pytest imports us
    import yate_rules as yr  # type: ignore[no-redef]

__all__ = ["FakeYate", "YMessage", "Handler", "DEFAULT_ENGINE_PARAMS"]


def _b(s: Union[str, bytes]) -> bytes:
    """str → wire bytes (lossless for bytes decoded by :func:`_s`)."""
    if isinstance(s, bytes):
        return s
    return str(s).encode("utf-8", "surrogateescape")


def _s(b: bytes) -> str:
    """wire bytes → str; invalid UTF-8 survives as surrogate escapes."""
    return b.decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------
# Public message type
# --------------------------------------------------------------------------


@dataclass(eq=False)
class YMessage:
    """A Yate message as seen by tests.

    ``params`` is a list of ``(name, value)`` in order, duplicates kept (like
    ``NamedList``).  Handlers registered with :meth:`FakeYate.on` may change
    ``name`` (renaming affects which later handlers match, ref Surprise 26),
    ``retval`` and ``params`` in place.

    Result fields (filled by :meth:`FakeYate.dispatch` and for the script's
    own messages): ``handled`` -- the dispatcher's return value;
    ``answered`` -- the script matched our ``%%>message`` with an answer;
    ``timed_out`` -- the script did not answer within its ``timeout``;
    ``outcome`` -- one of ``answered``, ``timeout``, ``dropped`` (script died
    while holding it), ``refused`` (maxqueue / dead / own message),
    ``write-failed``, ``not-delivered`` (no script relay matched), or
    ``dispatched`` for messages the script emitted.
    """

    name: str
    retval: str = ""
    params: list[tuple[str, str]] = field(default_factory=list)
    id: str = ""
    time: int = 0
    broadcast: bool = False
    handled: bool = False
    answered: bool = False
    timed_out: bool = False
    outcome: str = ""
    #: for messages in :attr:`FakeYate.sent_by_script`: the final message
    #: after dispatch (what the answer line carried), once available.
    result: Optional["YMessage"] = None

    # NamedList-like helpers -------------------------------------------
    def get(self, key: str, default: Optional[str] = None) -> Optional[str]:
        """Value of the first param named *key* (``NamedList::getParam``)."""
        for k, v in self.params:
            if k == key:
                return v
        return default

    def getall(self, key: str) -> list[str]:
        return [v for k, v in self.params if k == key]

    def __getitem__(self, key: str) -> str:
        v = self.get(key)
        if v is None:
            raise KeyError(key)
        return v

    def __contains__(self, key: object) -> bool:
        return any(k == key for k, _ in self.params)

    def set(self, key: str, value: str) -> None:
        """``setParam``: replace the first *key*, else append."""
        for i, (k, _) in enumerate(self.params):
            if k == key:
                self.params[i] = (key, value)
                return
        self.params.append((key, value))

    def add(self, key: str, value: str) -> None:
        """``addParam``: always append (duplicates allowed)."""
        self.params.append((key, value))

    def clear(self, key: str) -> None:
        """``clearParam``: remove every *key*."""
        self.params = [(k, v) for k, v in self.params if k != key]

    def as_dict(self) -> dict[str, str]:
        """First value of each name."""
        d: dict[str, str] = {}
        for k, v in self.params:
            d.setdefault(k, v)
        return d

    def copy(self) -> "YMessage":
        return YMessage(
            self.name, self.retval, list(self.params), self.id, self.time, self.broadcast,
            self.handled, self.answered, self.timed_out, self.outcome,
        )

    # wire conversion ---------------------------------------------------
    def to_wire(self) -> yr.WireMessage:
        return yr.WireMessage(_b(self.name), _b(self.retval), [(_b(k), _b(v)) for k, v in self.params])

    def update_from_wire(self, w: yr.WireMessage) -> None:
        self.name = _s(w.name)
        self.retval = _s(w.retval)
        self.params = [(_s(k), _s(v)) for k, v in w.params]


HandlerFunc = Callable[[YMessage], Union[bool, Awaitable[bool]]]
ParamsArg = Union[Mapping[str, Any], Iterable[tuple[str, Any]], None]


def _params_list(params: ParamsArg) -> list[tuple[str, str]]:
    if params is None:
        return []
    items = params.items() if isinstance(params, Mapping) else params
    return [(str(k), str(v)) for k, v in items]


# --------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------

#: Engine run parameters answered to ``setlocal engine.<P>`` (ref §1.4.7).
DEFAULT_ENGINE_PARAMS: dict[str, str] = {
    "version": "6.4.1",
    "release": "1",
    "revision": "1",
    "nodename": "fakeyate",
    "configname": "yate",
    "sharedpath": "/usr/share/yate",
    "configpath": "/etc/yate",
    "usercfgpath": "/root/.yate",
    "cfgsuffix": ".conf",
    "modulepath": "/usr/lib/yate",
    "modsuffix": ".yate",
    "logfile": "",
    "interactive": "false",
    "clientmode": "false",
    "supervised": "false",
    "runattempt": "1",
    "lastsignal": "0",
    "minworkers": "1",
    "maxworkers": "10",
    "addworkers": "1",
    "maxmsgrate": "0",
    "maxmsgage": "0",
    "maxqueued": "0",
    "maxevents": "25",
    "affinity": "",
    "trackparam": "handlers",
}


@dataclass(eq=False)
class Handler:
    """One entry of the fake engine's handler list (script relay or test handler)."""

    name: str
    priority: int
    seq: int
    func: Optional[HandlerFunc] = None  # test handler
    rcv: Optional["_Receiver"] = None  # script relay
    track: str = ""  # full track name, e.g. "sip:110" ('' = not tracked)
    filter: Optional[tuple[str, str]] = None
    active: bool = True

    def sort_key(self) -> tuple[int, int, int]:
        # Yate sorts by unsigned priority; ties are broken by object address
        # (arbitrary).  We put script relays first, then by install order.
        return (self.priority & 0xFFFFFFFF, 0 if self.rcv is not None else 1, self.seq)

    def matches(self, msg: YMessage) -> bool:
        if not self.active or self.name != msg.name:
            return False
        if self.filter is not None:
            fname, fvalue = self.filter
            if (msg.get(fname) or "") != fvalue:  # missing param compares as ""
                return False
        return True


@dataclass(eq=False)
class _Holder:
    """``MsgHolder``: one message waiting for the script's answer."""

    id: bytes
    msg: yr.WireMessage
    ret: bool = False
    matched: bool = False
    event: asyncio.Event = field(default_factory=asyncio.Event)


class _Receiver:
    """``ExtModReceiver`` for one spawned process (state resets per process)."""

    def __init__(self, fy: "FakeYate", proc: asyncio.subprocess.Process, index: int) -> None:
        self.fy = fy
        self.proc = proc
        self.index = index
        self.dead = False  # m_dead: lines are no longer processed, dispatch refused
        self.quit = False  # m_quit
        self.closing = False  # stdin close requested
        self.stdin_closed = asyncio.Event()
        self.sigterm_sent = False
        # setlocal state (ref §1.4.7), defaults from [general]
        self.timeout = fy._timeout_ms
        self.maxqueue = fy._maxqueue
        self.bufsize = fy._bufsize
        self.restart = False
        self.reenter = False
        self.setdata = True
        self.settime = fy._settime
        self.selfwatch = False
        self.timebomb = fy._timebomb
        self.trackname = fy._trackname
        self.reason = ""
        self.debuglevel = fy._debuglevel
        self.debugname = fy.script_name
        self.debugname_set = False
        # protocol state
        self.relays: dict[str, Handler] = {}
        self.watches: list[str] = []  # wildcard ('') inserted first
        self.holders: list[_Holder] = []
        self.wq: asyncio.Queue[Optional[tuple[bytes, Optional[asyncio.Future[bool]]]]] = asyncio.Queue()
        self.reader_task: Optional[asyncio.Task[None]] = None
        self.writer_task: Optional[asyncio.Task[None]] = None

    def watched(self, name: str) -> bool:
        return any(w == "" or w == name for w in self.watches)


def _child_signals() -> None:  # pragma: no cover - runs in the child
    """Signal dispositions of the child as ext.cpp:1133-1139 sets them (ref §1.1)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # inherited from Yate


# --------------------------------------------------------------------------
# FakeYate
# --------------------------------------------------------------------------


class FakeYate:
    """The Yate side of one ``[scripts]`` entry (a spawned *global* script).

    Use inside ``asyncio.run(...)``::

        async def scenario():
            async with FakeYate(path, "arg") as fy:
                await fy.wait_installed("sip.subscribe")
                res = await fy.dispatch("sip.subscribe", {"called": "234"})
                assert res.handled and not fy.failures
        asyncio.run(scenario())

    Constructor knobs beyond the brief: ``trackname`` (``[general]
    trackparam``: the script's initial track name, default none), ``timebomb``
    and ``settime`` (``[general]`` defaults), ``script_name`` (the
    ``[scripts]`` key, default ``basename(path)``), ``config`` (yate.conf
    sections for ``setlocal config.*``), ``loaded_plugins`` (for
    ``loaded.*``), ``kill_grace_ms`` (delay before SIGTERM, 30), ``max_spawns``
    (guard against instant crash-respawn loops in tests).
    """

    #: What the ``%%<setlocal:settime:...`` reply shows.  The public
    #: extmodule.cpp has ``val = m_setdata;`` in the settime branch, so the
    #: reply echoes *setdata* (a copy/paste slip; the setting itself is
    #: applied).  The reference table does not mention the reply value; set
    #: this to False to echo settime instead.
    SETTIME_REPLY_SHOWS_SETDATA = True

    def __init__(
        self,
        path: str,
        arg: str = "",
        *,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        timeout_ms: int = 10000,
        maxqueue: int = 1000,
        bufsize: int = 8192,
        debuglevel: int = 5,
        engine_params: Optional[Mapping[str, str]] = None,
        respawn: bool = True,
        trackname: str = "",
        timebomb: bool = False,
        settime: bool = False,
        script_name: Optional[str] = None,
        config: Optional[Mapping[str, Mapping[str, str]]] = None,
        loaded_plugins: Optional[Iterable[str]] = None,
        kill_grace_ms: int = 30,
        max_spawns: int = 50,
    ) -> None:
        self.path = path
        self.arg = arg
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.respawn = respawn
        self.script_name = script_name if script_name is not None else os.path.basename(path)
        self._timeout_ms = timeout_ms
        self._maxqueue = maxqueue
        self._bufsize = bufsize
        self._debuglevel = debuglevel
        self._trackname = trackname
        self._timebomb = timebomb
        self._settime = settime
        self.kill_grace_ms = kill_grace_ms
        self.max_spawns = max_spawns
        self.runid = str(int(time.time()))
        ep = dict(DEFAULT_ENGINE_PARAMS)
        ep["runid"] = self.runid
        ep["workpath"] = os.path.abspath(cwd or os.getcwd())
        if engine_params:
            ep.update({str(k): str(v) for k, v in engine_params.items()})
        self.engine_params: dict[str, str] = ep
        self.config: dict[str, dict[str, str]] = {k: dict(v) for k, v in (config or {}).items()}
        self.loaded_plugins: set[str] = set(
            loaded_plugins if loaded_plugins is not None
            else ("extmodule", "ysipchan", "regfile", "regexroute")
        )

        # --- observable results -------------------------------------------
        #: every protocol violation of the script, "<category>: <detail>"
        self.failures: list[str] = []
        #: (level, text) decoded from %%>debug
        self.debug_lines: list[tuple[int, str]] = []
        #: raw (trimmed, not unescaped) text from %%>output
        self.output_lines: list[str] = []
        #: messages the script emitted with %%>message, as decoded
        self.sent_by_script: list[YMessage] = []
        #: ("S>Y" | "Y>S" | "EVT", line) for every line in both directions
        #: ("S>Y!" for script lines read but ignored after die())
        self.transcript: list[tuple[str, bytes]] = []
        #: messages the script did not answer within its timeout
        self.timeouts: list[YMessage] = []
        #: (message name, reason) of deliveries refused (maxqueue, dead, ...)
        self.refusals: list[tuple[str, str]] = []
        #: exceptions raised by handlers registered with on()
        self.handler_errors: list[BaseException] = []
        #: return codes of the processes that exited, in order
        self.exit_codes: list[Optional[int]] = []
        #: everything the script(s) wrote to stderr
        self.stderr_data = bytearray()
        self.spawn_count = 0

        self._rcv: Optional[_Receiver] = None
        self._handlers: list[Handler] = []
        self._seq = itertools.count()
        self._holder_seq = itertools.count()
        self._holder_base = 0x55D5C6F0A1B0 + random.randrange(0, 0x10000) * 0x1000
        self._tasks: set[asyncio.Task[Any]] = set()
        self._procs: list[asyncio.subprocess.Process] = []
        self._stopping = False

    # ------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------
    async def __aenter__(self) -> "FakeYate":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Spawn the script (``execl(path, path, arg)``, ref §1.1)."""
        await self._spawn()

    @property
    def proc(self) -> Optional[asyncio.subprocess.Process]:
        """The current (latest) script process."""
        return self._rcv.proc if self._rcv else None

    @property
    def alive(self) -> bool:
        """Whether the current receiver still talks to its script."""
        return self._rcv is not None and not self._rcv.dead

    async def _spawn(self) -> None:
        self.spawn_count += 1
        proc = await asyncio.create_subprocess_exec(
            self.path,
            self.arg,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.cwd,
            env=self.env,
            close_fds=True,
            restore_signals=False,
            preexec_fn=_child_signals,
        )
        self._procs.append(proc)
        rcv = _Receiver(self, proc, self.spawn_count)
        self._rcv = rcv
        self.transcript.append(("EVT", f"spawn #{rcv.index} pid={proc.pid}".encode()))
        rcv.writer_task = self._task(self._writer(rcv))
        rcv.reader_task = self._task(self._reader(rcv))
        self._task(self._stderr_reader(proc))
        self._task(self._exit_watcher(proc, rcv.index))

    def _task(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    async def _stderr_reader(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            data = await proc.stderr.read(65536)
            if not data:
                return
            self.stderr_data += data

    async def _exit_watcher(self, proc: asyncio.subprocess.Process, index: int) -> None:
        rc = await proc.wait()
        self.exit_codes.append(rc)
        self.transcript.append(("EVT", f"exit #{index} rc={rc}".encode()))

    @property
    def stderr(self) -> str:
        """stderr of all spawned processes, decoded leniently."""
        return self.stderr_data.decode("utf-8", "replace")

    async def close_stdin(self, *, respawn: bool = False) -> None:
        """EOF to the script, then SIGTERM ``kill_grace_ms`` later if still alive.

        This is ``die()`` (``external stop``, ref §1.6): from now on Yate ignores
        the script's lines and refuses deliveries.  ``restart`` is honoured only
        with ``respawn=True`` (``external stop`` clears it).
        """
        rcv = self._rcv
        if rcv is None:
            return
        await self._teardown(rcv, reason="close_stdin", eof=False, allow_restart=respawn, die=True)

    async def wait_exit(self, timeout: float = 5.0) -> Optional[int]:
        """Wait for the *current* process to exit; return its return code.

        Raises ``asyncio.TimeoutError`` if it does not exit in time.
        """
        proc = self.proc
        if proc is None:
            return None
        return await asyncio.wait_for(proc.wait(), timeout)

    async def stop(self) -> None:
        """Tear everything down (no respawn); kill leftovers; cancel tasks."""
        self._stopping = True
        rcv = self._rcv
        if rcv is not None and not rcv.dead:
            await self._teardown(rcv, reason="stop", eof=False, allow_restart=False, die=True)
        for proc in self._procs:
            if proc.returncode is None:
                try:
                    await asyncio.wait_for(proc.wait(), 2.0)
                except asyncio.TimeoutError:
                    try:
                        proc.kill()
                    except ProcessLookupError:
                        pass
                    try:
                        await asyncio.wait_for(proc.wait(), 2.0)
                    except asyncio.TimeoutError:
                        pass
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------
    # observation helpers
    # ------------------------------------------------------------------
    @property
    def installs(self) -> dict[str, tuple[int, Optional[str], Optional[str]]]:
        """``{name: (priority, filter_name, filter_value)}`` of the current script."""
        if self._rcv is None:
            return {}
        return {
            n: (h.priority, h.filter[0] if h.filter else None, h.filter[1] if h.filter else None)
            for n, h in self._rcv.relays.items()
        }

    @property
    def watches(self) -> set[str]:
        return set(self._rcv.watches) if self._rcv else set()

    @property
    def settings(self) -> dict[str, Any]:
        """Current setlocal values of the current script (ref §1.4.7)."""
        r = self._rcv
        if r is None:
            return {}
        return {
            "timeout": r.timeout,
            "maxqueue": r.maxqueue,
            "bufsize": r.bufsize,
            "restart": r.restart,
            "reenter": r.reenter,
            "setdata": r.setdata,
            "settime": r.settime,
            "selfwatch": r.selfwatch,
            "timebomb": r.timebomb,
            "trackparam": r.trackname,
            "reason": r.reason,
            "debuglevel": r.debuglevel,
            "debugname": r.debugname,
        }

    @property
    def queue_length(self) -> int:
        """Messages currently waiting for the script's answer (``m_qLength``)."""
        return len(self._rcv.holders) if self._rcv else 0

    def lines_to_script(self) -> list[bytes]:
        return [line for d, line in self.transcript if d == "Y>S"]

    def lines_from_script(self) -> list[bytes]:
        return [line for d, line in self.transcript if d == "S>Y"]

    async def wait_until(self, predicate: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
        """Poll *predicate* every 5 ms until truthy; return its value.

        Raises ``asyncio.TimeoutError`` with the tail of the transcript.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            v = predicate()
            if v:
                return v
            if loop.time() >= deadline:
                tail = "\n".join(f"  {d} {line[:200]!r}" for d, line in self.transcript[-15:])
                raise asyncio.TimeoutError(
                    f"timed out waiting for {what or predicate!r}\nfailures={self.failures}\n"
                    f"stderr={self.stderr[-2000:]}\ntranscript tail:\n{tail}"
                )
            await asyncio.sleep(0.005)

    async def wait_installed(self, name: str, timeout: float = 5.0) -> tuple[int, Optional[str], Optional[str]]:
        """Wait until the current script has a relay for *name*."""
        return await self.wait_until(lambda: self.installs.get(name), timeout, f"install of {name!r}")

    async def wait_sent(self, name: str, timeout: float = 5.0, count: int = 1) -> YMessage:
        """Wait until the script emitted *count* ``%%>message`` named *name*; return the last."""

        def pred() -> Optional[YMessage]:
            found = [m for m in self.sent_by_script if m.name == name]
            return found[count - 1] if len(found) >= count else None

        return await self.wait_until(pred, timeout, f"%%>message {name!r} x{count}")

    async def wait_line(self, prefix: bytes, direction: str = "S>Y", timeout: float = 5.0) -> bytes:
        """Wait for a transcript line starting with *prefix*; return it."""

        def pred() -> Optional[bytes]:
            for d, line in self.transcript:
                if d == direction and line.startswith(prefix):
                    return line
            return None

        return await self.wait_until(pred, timeout, f"{direction} line {prefix!r}")

    # ------------------------------------------------------------------
    # engine side: handlers, dispatch, watches
    # ------------------------------------------------------------------
    def on(
        self,
        name: str,
        handler: HandlerFunc,
        priority: int = 100,
        *,
        track: Optional[str] = None,
        filter: Optional[tuple[str, str]] = None,
    ) -> Handler:
        """Install a test handler (another Yate module) for *name*.

        ``handler(msg) -> bool | Awaitable[bool]`` may change ``msg.retval`` /
        ``msg.params`` / ``msg.name`` and may sleep.  *track* adds
        ``<track>:<priority>`` to the engine's tracking param (``handlers``)
        when it runs, as tracked Yate modules do.  At equal priority the
        script's relay runs first.
        """
        h = Handler(name, priority, next(self._seq), func=handler,
                    track=f"{track}:{priority & 0xFFFFFFFF}" if track else "", filter=filter)
        self._handlers.append(h)
        return h

    def off(self, handler_or_name: Union[Handler, str]) -> None:
        """Remove a test handler (or all test handlers for a name)."""
        for h in list(self._handlers):
            if h is handler_or_name or h.name == handler_or_name:
                h.active = False
                self._handlers.remove(h)

    async def dispatch(
        self,
        name: str,
        params: ParamsArg = None,
        retval: str = "",
        *,
        broadcast: bool = False,
    ) -> YMessage:
        """Dispatch a message in the fake engine; the script gets it if it installed it.

        Runs the handler chain (script relays whose name and filter match,
        plus :meth:`on` handlers) in priority order, stopping at the first
        ``true`` unless *broadcast*; then the post-dispatch watchers.  Returns
        the final message with ``handled``, ``answered``, ``timed_out``,
        ``outcome`` and ``id`` (the holder id used for the script).
        """
        msg = YMessage(name, retval, _params_list(params), time=int(time.time()), broadcast=broadcast)
        msg.outcome = "not-delivered"
        await self._engine_dispatch(msg, origin=None)
        return msg

    async def watch_notify(
        self, name: str, params: ParamsArg = None, retval: str = "", handled: bool = True
    ) -> bool:
        """Send ``%%<message::<handled>:<name>:<retval>:<params>`` if the script watches *name*.

        Returns whether a line was written (ref §1.4.6).
        """
        rcv = self._rcv
        if rcv is None or rcv.dead or not rcv.watched(name):
            return False
        msg = YMessage(name, retval, _params_list(params))
        return await self._send(rcv, yr.encode_answer_line(b"", handled, msg.to_wire()))

    async def _engine_dispatch(self, msg: YMessage, origin: Optional[_Receiver]) -> bool:
        """``MessageDispatcher::dispatch`` + post-hooks (ref §1.4.2, §1.4.6).

        *origin* is the receiver that emitted the message with a non-empty id
        (its "own" message), or None.
        """
        rcv = self._rcv
        handlers: list[Handler] = list(self._handlers)
        if rcv is not None and not rcv.dead:
            handlers.extend(rcv.relays.values())
        handlers.sort(key=Handler.sort_key)
        trackparam = self.engine_params.get("trackparam", "")
        retv = False
        for h in handlers:
            if not h.matches(msg):
                continue
            if trackparam and h.track:
                cur = msg.get(trackparam)
                if cur is None:
                    msg.add(trackparam, h.track)
                else:
                    msg.set(trackparam, f"{cur},{h.track}" if cur else h.track)
            if h.rcv is not None:
                r = await self._relay_received(h.rcv, h, msg, origin)
            else:
                r = await self._call_handler(h, msg)
            retv = r or retv
            if retv and not msg.broadcast:
                break
        msg.handled = retv
        # post-dispatch hook of the script's MsgWatcher
        rcv = self._rcv
        if rcv is not None and not rcv.dead and rcv.watched(msg.name):
            if rcv.selfwatch or origin is not rcv:
                self._send(rcv, yr.encode_answer_line(b"", retv, msg.to_wire()))
        return retv

    async def _call_handler(self, h: Handler, msg: YMessage) -> bool:
        assert h.func is not None
        try:
            r = h.func(msg)
            if inspect.isawaitable(r):
                r = await r
            return bool(r)
        except Exception as e:  # a bug in the test's handler
            self.handler_errors.append(e)
            return False

    def _new_holder_id(self) -> bytes:
        """``"%p.%ld"`` of a holder, e.g. ``0x55d5c6f0a1b0.1804289383`` (ref §1.4.1)."""
        addr = self._holder_base + next(self._holder_seq) * 0x60
        return f"0x{addr:x}.{random.randrange(0, 2**31)}".encode()

    async def _relay_received(
        self, rcv: _Receiver, relay: Handler, msg: YMessage, origin: Optional[_Receiver]
    ) -> bool:
        """``ExtModReceiver::received`` (ref §1.5): deliver to the script and wait."""
        if rcv.dead or rcv.quit or rcv.closing:
            self.refusals.append((msg.name, "script dead or quitting"))
            msg.outcome = "refused"
            return False
        if origin is rcv and not rcv.reenter:
            msg.outcome = "refused"
            return False
        if rcv.maxqueue and len(rcv.holders) >= rcv.maxqueue:
            self.refusals.append((msg.name, f"already having {len(rcv.holders)} queued messages"))
            msg.outcome = "refused"
            return False
        loop = asyncio.get_running_loop()
        tout = rcv.timeout
        deadline = loop.time() + tout / 1000.0 if tout > 0 else None
        holder = _Holder(self._new_holder_id(), msg.to_wire())
        msg.id = _s(holder.id)
        rcv.holders.append(holder)
        ok = await self._send(rcv, yr.encode_message_line(holder.id, msg.time, holder.msg))
        if not ok:
            if holder in rcv.holders:
                rcv.holders.remove(holder)
            msg.outcome = "write-failed"
            if rcv.timebomb:
                self._schedule_die(rcv)
            return False
        timed_out = False
        if not holder.event.is_set():
            try:
                if deadline is None:
                    await holder.event.wait()
                else:
                    await asyncio.wait_for(holder.event.wait(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                pass
        if not holder.matched and not holder.event.is_set():
            timed_out = True
            if holder in rcv.holders:
                rcv.holders.remove(holder)
        # changes that arrived (even from unmatched, partially applied answers) stay
        msg.update_from_wire(holder.msg)
        if holder.matched:
            msg.answered = True
            msg.outcome = "answered"
        elif timed_out:
            msg.timed_out = True
            msg.outcome = "timeout"
            self.timeouts.append(msg)
            if rcv.timebomb:
                self._schedule_die(rcv)
        else:
            msg.outcome = "dropped"
        return holder.ret

    def _schedule_die(self, rcv: _Receiver) -> None:
        self._task(self._teardown(rcv, reason="timebomb", eof=False, allow_restart=True, die=True))

    async def _run_script_message(self, rcv: _Receiver, sent: YMessage, msg: YMessage, mid: bytes) -> None:
        """Dispatch a ``%%>message`` of the script, then answer it (ref §1.4.3)."""
        own = rcv if mid else None  # an empty id is not recognised as the script's own
        handled = await self._engine_dispatch(msg, origin=own)
        msg.handled = handled
        msg.outcome = "dispatched"
        sent.result = msg
        if mid:
            self._send(rcv, yr.encode_answer_line(mid, handled, msg.to_wire()))

    # ------------------------------------------------------------------
    # pipe I/O
    # ------------------------------------------------------------------
    def _send(self, rcv: _Receiver, line: bytes) -> "asyncio.Future[bool]":
        """Queue one line for the script (no length limit, ref §1.2).

        Returns a future resolved with whether it was written.  Writes are in
        order; the reader never waits on them.
        """
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if rcv.closing or rcv.stdin_closed.is_set():
            fut.set_result(False)
        else:
            rcv.wq.put_nowait((line, fut))
        return fut

    async def _writer(self, rcv: _Receiver) -> None:
        stdin = rcv.proc.stdin
        assert stdin is not None
        broken = False
        try:
            while True:
                item = await rcv.wq.get()
                if item is None:
                    break
                line, fut = item
                ok = False
                if not broken:
                    try:
                        stdin.write(line + b"\n")
                        await stdin.drain()
                        ok = True
                        self.transcript.append(("Y>S", line))
                    except (BrokenPipeError, ConnectionResetError, OSError):
                        broken = True
                if fut is not None and not fut.done():
                    fut.set_result(ok)
        finally:
            try:
                stdin.close()
            except Exception:
                pass
            rcv.stdin_closed.set()
            while not rcv.wq.empty():
                item = rcv.wq.get_nowait()
                if item is not None and item[1] is not None and not item[1].done():
                    item[1].set_result(False)

    async def _close_stdin(self, rcv: _Receiver) -> None:
        """Close the script's stdin after the lines already queued (``closeOut``)."""
        if not rcv.closing:
            rcv.closing = True
            rcv.wq.put_nowait(None)
        try:
            await asyncio.wait_for(rcv.stdin_closed.wait(), 1.0)
        except asyncio.TimeoutError:
            # the script does not read its stdin: force it shut
            if rcv.writer_task is not None:
                rcv.writer_task.cancel()
                try:
                    await rcv.writer_task
                except BaseException:
                    pass
            try:
                assert rcv.proc.stdin is not None
                rcv.proc.stdin.transport.abort()  # type: ignore[attr-defined]
            except Exception:
                pass
            rcv.stdin_closed.set()

    def _close_stdout(self, rcv: _Receiver) -> None:
        """``closeIn``: Yate closes its read end once it stops reading.

        Also needed for asyncio: ``Process.wait()`` only returns when every
        pipe is disconnected, which a full, unread stdout pipe never is.
        """
        transport = getattr(rcv.proc, "_transport", None)
        pipe = transport.get_pipe_transport(1) if transport is not None else None
        if pipe is not None:
            try:
                pipe.close()
            except Exception:
                pass

    async def _reader(self, rcv: _Receiver) -> None:
        """``ExtModReceiver::run`` read loop (ref §1.2)."""
        stdout = rcv.proc.stdout
        assert stdout is not None
        buf = bytearray()
        while True:
            bufspace = rcv.bufsize - len(buf) - 1
            if bufspace <= 0:
                self._failure(
                    "overflow",
                    f"line longer than bufsize-2 = {rcv.bufsize - 2} bytes (starts {bytes(buf[:80])!r}): "
                    "Yate closes the script",
                )
                await self._teardown(rcv, reason="overflow", eof=False)
                return
            try:
                data = await stdout.read(bufspace)
            except (ConnectionResetError, OSError):
                data = b""
            if not data:
                if buf and not rcv.dead:
                    self._failure("eof", f"unterminated last line lost at EOF: {bytes(buf[:200])!r}")
                await self._teardown(rcv, reason="eof", eof=True)
                return
            buf += data
            totalsize = len(buf)
            while True:
                nl = buf.find(b"\n")
                nul = buf.find(b"\x00")
                if nul >= 0 and (nl < 0 or nul < nl):
                    end = nul
                    if not rcv.dead:
                        self._failure("lint", f"NUL byte ends a line early: {bytes(buf[:end + 1])!r}")
                elif nl >= 0:
                    end = nl
                else:
                    break
                raw = bytes(buf[:end])
                line = raw[:-1] if raw.endswith(b"\r") else raw
                consumed = end + 1
                if line:
                    # "S>Y!" marks lines Yate no longer processes (after die())
                    self.transcript.append(("S>Y!" if rcv.dead else "S>Y", raw))
                    bufsize_now = rcv.bufsize
                    go_out = self._process_line(rcv, raw, line, bufsize_now)
                    if go_out:
                        await self._teardown(rcv, reason="quit", eof=False)
                        return
                    if totalsize >= rcv.bufsize:
                        self._failure(
                            "overflow", f"lost data shrinking the read buffer to {rcv.bufsize}: Yate closes the script"
                        )
                        await self._teardown(rcv, reason="shrink", eof=False)
                        return
                totalsize -= consumed
                del buf[:consumed]

    def _failure(self, category: str, detail: str) -> None:
        self.failures.append(f"{category}: {detail}")

    # ------------------------------------------------------------------
    # processLine (ref §1.4)
    # ------------------------------------------------------------------
    def _process_line(self, rcv: _Receiver, raw: bytes, line: bytes, bufsize: int) -> bool:
        """Handle one line; return True when Yate stops reading (``%%>quit``)."""
        if rcv.dead:
            return False
        if rcv.quit:
            return True
        for p in yr.check_script_line(raw, bufsize=bufsize, role_known=True):
            self._failure("lint", f"{p} | line={raw[:300]!r}")
        kind = yr.script_line_keyword(line, role_known=True)
        if kind == "answer":
            self._handle_answer(rcv, line)
            return False
        if kind == "install":
            self._handle_install(rcv, line[len(b"%%>install:"):])
            return False
        if kind == "uninstall":
            name = _s(line[len(b"%%>uninstall:"):])
            h = rcv.relays.pop(name, None)
            prio = 0
            if h is not None:
                h.active = False
                prio = h.priority
            self._send(rcv, b"%%<uninstall:" + str(prio).encode() + b":" + _b(name) + b":" + yr.yate_bool_text(h is not None))
            return False
        if kind == "watch":
            name = _s(line[len(b"%%>watch:"):])
            ok = name not in rcv.watches
            if ok:
                if name == "":
                    rcv.watches.insert(0, name)
                else:
                    rcv.watches.append(name)
            self._send(rcv, b"%%<watch:" + _b(name) + b":" + yr.yate_bool_text(ok))
            return False
        if kind == "unwatch":
            name = _s(line[len(b"%%>unwatch:"):])
            ok = name in rcv.watches
            if ok:
                rcv.watches.remove(name)
            self._send(rcv, b"%%<unwatch:" + _b(name) + b":" + yr.yate_bool_text(ok))
            return False
        if kind == "output":
            self.output_lines.append(_s(yr.trim_blanks(line[len(b"%%>output:"):])))
            return False
        if kind == "debug":
            parsed = yr.parse_debug(line[len(b"%%>debug:"):])
            if parsed is not None:
                self.debug_lines.append((parsed[0], _s(parsed[1])))
                return False
        elif kind == "setlocal":
            parsed_sl = yr.parse_setlocal(line[len(b"%%>setlocal:"):])
            if parsed_sl is not None:
                name_b, val_b = parsed_sl
                out, ok = self._setlocal(rcv, name_b, val_b)
                self._send(rcv, b"%%<setlocal:" + name_b + b":" + out + b":" + yr.yate_bool_text(ok))
                return False
        elif kind == "quit":
            rcv.quit = True
            self._send(rcv, b"%%<quit")
            return True
        elif kind == "message":
            code, sm = yr.decode_script_message(line)
            if code == -2 and sm is not None:
                self._handle_script_message(rcv, sm)
                return False
        # everything else: Error in: (ref §1.4.11)
        self._failure("error-in", f"Yate answered 'Error in:' to {line[:300]!r}")
        self._send(rcv, b"Error in: " + line)
        return False

    def _handle_answer(self, rcv: _Receiver, line: bytes) -> None:
        for holder in list(rcv.holders):
            code, holder.ret = yr.decode_answer(line, holder.id, holder.msg, holder.ret)
            if code == -2:
                holder.matched = True
                rcv.holders.remove(holder)
                holder.event.set()
                return
        self._failure("unmatched", f"answer matches no waiting message: {line[:300]!r}")

    def _handle_install(self, rcv: _Receiver, rest: bytes) -> None:
        req = yr.parse_install(rest)
        name = _s(req.name)
        ok = bool(req.name) and not rcv.dead and name not in rcv.relays
        if ok:
            track = f"{rcv.trackname}:{req.priority & 0xFFFFFFFF}" if rcv.trackname else ""
            filt = (_s(req.filter_name), _s(req.filter_value or b"")) if req.filter_name else None
            rcv.relays[name] = Handler(name, req.priority, next(self._seq), rcv=rcv, track=track, filter=filt)
        self._send(rcv, b"%%<install:" + str(req.priority).encode() + b":" + req.name + b":" + yr.yate_bool_text(ok))

    def _handle_script_message(self, rcv: _Receiver, sm: yr.ScriptMessage) -> None:
        now = int(time.time())
        tm = now if (rcv.settime or not sm.time) else sm.time
        sent = YMessage(_s(sm.msg.name), _s(sm.msg.retval), [(_s(k), _s(v)) for k, v in sm.msg.params],
                        id=_s(sm.id), time=tm)
        self.sent_by_script.append(sent)
        live = sent.copy()
        live.result = None
        self._task(self._run_script_message(rcv, sent, live, sm.id))

    def _setlocal(self, rcv: _Receiver, name: bytes, val: bytes) -> tuple[bytes, bool]:
        """The ``%%>setlocal`` branches of ext.cpp:1562-1702 (ref §1.4.7).

        Returns ``(reply value, ok)``.  Global script: ``id``/``disconnected``
        are unknown names.
        """
        tb = yr.yate_bool_text
        if name == b"trackparam":
            if not val:
                val = _b(rcv.trackname)
            else:
                rcv.trackname = _s(val)
            return val, True
        if name == b"reason":
            rcv.reason = _s(val)
            return val, True
        if name == b"timeout":
            rcv.timeout = yr.yate_to_integer(val, rcv.timeout)
            return str(rcv.timeout).encode(), True
        if name == b"timebomb":
            rcv.timebomb = yr.yate_to_boolean(val, rcv.timebomb)
            return tb(rcv.timebomb), True
        if name == b"maxqueue":
            rcv.maxqueue = yr.yate_to_integer(val, rcv.maxqueue, 0, yr.MAX_MAXQUEUE)
            return str(rcv.maxqueue).encode(), True
        if name == b"bufsize":
            rcv.bufsize = yr.yate_to_integer(val, rcv.bufsize, yr.MIN_BUFSIZE, yr.MAX_BUFSIZE)
            return str(rcv.bufsize).encode(), True
        if name == b"restart":
            # m_scripted && RoleGlobal: always true for a spawned [scripts] entry
            rcv.restart = yr.yate_to_boolean(val, rcv.restart)
            return tb(rcv.restart), True
        if name == b"reenter":
            rcv.reenter = yr.yate_to_boolean(val, rcv.reenter)
            return tb(rcv.reenter), True
        if name == b"setdata":
            rcv.setdata = yr.yate_to_boolean(val, rcv.setdata)
            return tb(rcv.setdata), True
        if name == b"settime":
            rcv.settime = yr.yate_to_boolean(val, rcv.settime)
            return tb(rcv.setdata if self.SETTIME_REPLY_SHOWS_SETDATA else rcv.settime), True
        if name == b"selfwatch":
            rcv.selfwatch = yr.yate_to_boolean(val, rcv.selfwatch)
            return tb(rcv.selfwatch), True
        if name.startswith(b"engine."):
            p = self.engine_params.get(_s(name[7:]))
            return (_b(p) if p is not None else b""), (not val and p is not None)
        if name.startswith(b"config."):
            ok = not val
            rest = _s(name[7:])
            sep = rest.find(".")
            if sep > 0:
                sect = rest[:sep].strip(" \t")
                key = rest[sep + 1:].strip(" \t")
                v = self.config.get(sect, {}).get(key)
                if v is None:
                    return b"", False
                return _b(v), ok
            return b"", rest in self.config
        if name.startswith(b"loaded."):
            return tb(_s(name[7:]) in self.loaded_plugins), not val
        if name == b"runid":
            return _b(self.runid), not val
        if name == b"debuglevel":
            if val:
                rcv.debuglevel = yr.yate_to_integer(val, rcv.debuglevel, 1, 10)
            return str(rcv.debuglevel).encode(), True
        if name == b"debugname":
            if val and not rcv.debugname_set:
                rcv.debugname = _s(val)
                rcv.debugname_set = True
            return _b(rcv.debugname), True
        return val, False

    # ------------------------------------------------------------------
    # teardown (ref §1.6)
    # ------------------------------------------------------------------
    def _flush(self, rcv: _Receiver) -> None:
        """``ExtModReceiver::flush``: drop watcher, relays and waiting messages."""
        rcv.watches.clear()
        for h in rcv.relays.values():
            h.active = False
        rcv.relays.clear()
        holders, rcv.holders = rcv.holders, []
        for holder in holders:
            holder.event.set()  # waiting dispatchers return holder.ret

    async def _teardown(
        self, rcv: _Receiver, *, reason: str, eof: bool, allow_restart: bool = True, die: bool = False
    ) -> None:
        """Close one script: EOF/overflow/quit path (reader) or ``die()`` (external).

        EOF path: flush, close stdin, grace, SIGTERM if alive.  Reader-return
        path (overflow, quit): close stdin, grace, SIGTERM, flush.  Both then
        respawn at once if ``restart`` is set (ref §1.4.10, §1.6).
        """
        if rcv.dead:
            return
        rcv.dead = True
        self.transcript.append(("EVT", f"teardown #{rcv.index} ({reason})".encode()))
        if eof:
            self._flush(rcv)
            await asyncio.sleep(0.005)  # waitflush
        await self._close_stdin(rcv)
        await asyncio.sleep(self.kill_grace_ms / 1000.0)
        if rcv.proc.returncode is None:
            try:
                rcv.proc.send_signal(signal.SIGTERM)
                rcv.sigterm_sent = True
                self.transcript.append(("EVT", f"SIGTERM #{rcv.index}".encode()))
            except ProcessLookupError:
                pass
        self._flush(rcv)
        if rcv.reader_task is not None and rcv.reader_task is not asyncio.current_task():
            rcv.reader_task.cancel()
        self._close_stdout(rcv)
        if rcv.writer_task is not None and rcv.writer_task is not asyncio.current_task():
            rcv.writer_task.cancel()
        if allow_restart and rcv.restart and self.respawn and not self._stopping and rcv is self._rcv:
            if self.spawn_count >= self.max_spawns:
                self._failure("respawn", f"crash loop: {self.spawn_count} spawns, not respawning")
                return
            try:
                await self._spawn()
            except OSError as e:
                self._failure("respawn", f"respawn failed: {e}")
