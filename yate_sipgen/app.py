"""The running script: config, engine, console, features, connection and lifecycle.

Start-up order (pipe mode, as Yate starts us from ``extmodule.conf [scripts]``):

1. read the config file (argv[1]); when it is bad, say why once in Yate's log, install only the
   console handlers (``status sipgen`` shows the error, ``sipgen reload`` retries) and do not
   exit: with ``restart`` unset Yate would not respawn us, and we must not spin either;
2. crash-loop back-off (``lifecycle``);
3. ``setlocal``: trackparam, bufsize 65536, timeout, maxqueue, restart; query debuglevel;
4. one ``install`` per message name and one ``watch`` per watched name;
5. serve. stdin EOF or SIGTERM: exit at once (everything acknowledged is already on disk).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any, Protocol

from . import config as config_mod
from . import logbridge, protocol as p
from .console import Console
from .engine import Engine
from .errors import ConfigError
from .lifecycle import STABLE_AFTER, Lifecycle
from .stats import Stats

log = logging.getLogger("yate_sipgen.app")


class Feature(Protocol):
    """What a feature module provides (one per SIP method or event package)."""

    name: str

    def setup(self, app: "App") -> None: ...  # register handlers, watchers, commands

    def reconfigure(self, cfg: config_mod.Config) -> None: ...  # apply a (re)loaded config

    def status(self) -> dict[str, Any]: ...  # counters for the status line

    async def start(self) -> None: ...  # after the connection to Yate is up

    async def close(self) -> None: ...


def config_schema() -> config_mod.Schema:
    """The sipgen.conf schema: the engine's keys and every feature's."""
    from .features import schema

    return schema()


def default_features() -> list[Any]:
    """The features a plain ``yate-sipgen`` runs (imported lazily: one module each)."""
    feats: list[Any] = []
    try:
        from .features import all_features
    except ImportError:
        return feats
    return all_features()


class App:
    def __init__(self, config_path: str, *, features: list[Any] | None = None) -> None:
        self.config_path = config_path
        self.schema = config_schema()  # every feature's keys, assembled here
        self.config_error: str | None = None
        try:
            self.config = config_mod.load(config_path, self.schema)
        except ConfigError as e:
            self.config_error = str(e)
            base = os.path.dirname(os.path.abspath(config_path)) if config_path else os.getcwd()
            self.config = config_mod.defaults(self.schema, base)
        g = self.config["general"]
        self.name: str = g["name"]
        self._mode: str = self.config["connection"]["mode"]
        self.stats = Stats()
        self.engine = Engine(**_engine_limits(g), stats=self.stats)
        self.engine.on_reply = self._on_reply
        self.console = Console(self.engine, self.name, self.status_info, self.reload,
                               self.set_debuglevel)
        self.console.command("reload", "", "re-read the configuration file")(self._reload_cmd)
        self.console.command("restart", "", "exit and let Yate start the new code (state is kept)")(
            self._restart_cmd)
        self.features: list[Any] = [] if self.config_error else (
            default_features() if features is None else features)
        self.lifecycle: Lifecycle | None = None
        self._stop: asyncio.Future[int] | None = None
        self._debuglevel = 5
        self.runid = ""  # Yate's engine.runid, once it answered
        self._setup_logging()
        for f in self.features:
            f.setup(self)
        if not self.config_error:
            self._load_extensions()
        if not self.config_error:
            for f in self.features:
                f.reconfigure(self.config)

    def feature(self, name: str) -> Any:
        """The running feature called ``name`` (for extensions), or ``None``."""
        for f in self.features:
            if getattr(f, "name", None) == name:
                return f
        return None

    def _load_extensions(self) -> None:
        import importlib.util

        for i, path in enumerate(self.config["general"]["extensions"]):
            try:
                spec = importlib.util.spec_from_file_location(f"sipgen_extension_{i}", path)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                mod.setup(self)
            except Exception as e:
                # a broken extension is a configuration error: say so, run without it
                self.stats.events["extension_error"] += 1
                self.config.warnings.append(f"extension {path} failed to load: {e!r}")

    # -- logging -------------------------------------------------------------------------------
    def _setup_logging(self) -> None:
        root = logbridge.root_logger()
        for h in list(root.handlers):
            root.removeHandler(h)
        root.addHandler(logbridge.YateLogHandler(self._log_sink, self._log_room))
        root.setLevel(logbridge.python_level(self._debuglevel))
        root.propagate = False

    def _log_sink(self, level: int, text: str) -> bool:
        s = self.engine.session
        if s is None:
            return False
        try:
            s.debug(level, text)
        except Exception:
            return False
        self.engine._schedule_flush()
        return True

    def _log_room(self) -> int:
        s = self.engine.session
        return (s.encoder.max_line if s else 8190) // 2 - 64

    def set_debuglevel(self, level: int) -> None:
        self._debuglevel = level
        self.console.debug_level = level
        logbridge.root_logger().setLevel(logbridge.python_level(level))
        if self.engine.session is not None:
            self.engine.send_keyword("setlocal", "debuglevel", str(level))

    # -- status --------------------------------------------------------------------------------
    def status_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"state": "config-error" if self.config_error else "running"}
        info.update(self.stats.summary())
        info["inprogress"] = self.engine.in_progress
        for f in self.features:
            info.update(f.status())
        return info

    # -- replies to our keyword lines ---------------------------------------------------------
    def _on_reply(self, ev: object) -> None:
        t = type(ev)
        if t is p.SetLocalReplied:
            if ev.name == "debuglevel" and ev.value.isdigit():
                lvl = int(ev.value)
                self._debuglevel = lvl
                self.console.debug_level = lvl
                logbridge.root_logger().setLevel(logbridge.python_level(lvl))
            elif ev.name == "engine.runid":
                self.runid = ev.value
            elif not ev.success:
                log.warning("Yate refused setlocal %s=%s", ev.name, ev.value)
        elif t in (p.InstallReplied, p.WatchReplied) and not ev.success:
            self.stats.events["install_failed"] += 1
            log.error("Yate refused to %s %s", "install" if t is p.InstallReplied else "watch",
                      ev.name)
        elif t is p.QuitReplied:
            pass

    # -- reload / restart -----------------------------------------------------------------------
    async def reload(self) -> str:
        """Re-read the config file; a bad file keeps the running config (and says why)."""
        try:
            new = await asyncio.get_running_loop().run_in_executor(
                None, config_mod.load, self.config_path, self.schema)
        except ConfigError as e:
            log.log(logbridge.CONF, "reload failed, keeping the running configuration: %s", e)
            return f"Reload failed, running configuration kept:\r\n{e}\r\n"
        for w in new.warnings:
            log.log(logbridge.CONF, "%s", w)
        if self.config_error:
            return ("Configuration is valid now; 'sipgen restart' starts the service with it.\r\n")
        old = self.config
        self.config = new
        g = new["general"]
        for name, value in _engine_limits(g).items():
            setattr(self.engine, name, value)
        if self.engine.session is not None:
            self.engine.session.answer_within = self.engine.answer_within
            if g["timeout"] != old["general"]["timeout"]:
                self.engine.send_keyword("setlocal", "timeout", str(g["timeout"]))
            if g["maxqueue"] != old["general"]["maxqueue"]:
                self.engine.send_keyword("setlocal", "maxqueue", str(g["maxqueue"]))
            if g["restart"] != old["general"]["restart"] and self.mode == "pipe":
                self.engine.send_keyword("setlocal", "restart", g["restart"])
        for f in self.features:
            f.reconfigure(new)
        log.info("configuration reloaded from %s", self.config_path or "(defaults)")
        notes = "".join(f"warning: {w}\r\n" for w in new.warnings)
        return f"Configuration reloaded from {self.config_path or '(defaults)'}.\r\n{notes}"

    async def _reload_cmd(self, args: list[str]) -> str:
        return await self.reload()

    def _restart_cmd(self, args: list[str]) -> str:
        if self.mode != "pipe":
            return "Restart needs pipe mode (Yate respawns scripts only); restart the service.\r\n"
        self.engine.send_keyword("setlocal", "restart", True)
        asyncio.get_running_loop().call_later(0.2, self.stop, 0)
        log.log(logbridge.NOTE, "restart requested from the console: exiting, Yate respawns us")
        return "Restarting: Yate respawns the script with the same argument.\r\n"

    @property
    def mode(self) -> str:
        """The transport this run uses (a reload cannot change it)."""
        return self._mode

    # -- running -------------------------------------------------------------------------------
    def setlocals(self) -> list[tuple[str, Any]]:
        g = self.config["general"]
        out: list[tuple[str, Any]] = [("trackparam", self.name), ("bufsize", p.MAX_BUFSIZE),
                                      ("timeout", g["timeout"]), ("maxqueue", g["maxqueue"])]
        if self.mode == "pipe":
            out.append(("restart", bool(g["restart"]) and not self.config_error))
        out.append(("debuglevel", ""))  # an empty value queries the current level
        out.append(("engine.runid", ""))  # this Yate run (TCP connection ids are only good in it)
        return out

    def stop(self, code: int = 0) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(code)

    async def run(self) -> int:
        """Serve until stdin EOF / SIGTERM / a restart; returns the exit code.

        The event loop never blocks from here on (the store opens in its own thread, the
        crash back-off is a timer), so Yate closing our stdin ends the run at once in every
        phase: Yate sends SIGTERM 30-60 ms later and a script still alive then is logged as
        "has not exited on closing stdin".
        """
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                loop.add_signal_handler(sig, self.stop, 0)
            except (NotImplementedError, RuntimeError):
                pass
        if self.mode == "pipe":
            code = await self._run_pipe()
        else:
            code = await self._run_socket()
        if self.lifecycle is not None:
            self.lifecycle.clean_exit()
        return code

    def _begin_lifecycle(self) -> float:
        """Record the start; the crash back-off delay (0 when none)."""
        if self.config_error:
            return 0.0
        self.lifecycle = Lifecycle(self.config["general"]["state_dir"])
        delay = self.lifecycle.begin()
        asyncio.get_running_loop().call_later(STABLE_AFTER, self.lifecycle.stable)
        return delay

    def _announce(self) -> None:
        if self.config_error:
            # %%>output is unconditional: the operator sees it whatever the debug level
            text = f"{self.name}: cannot start, bad configuration: {self.config_error}"
            self.engine.send_keyword("output", logbridge.safe(text.replace("\n", " | ")))
        for w in self.config.warnings:
            log.log(logbridge.CONF, "%s", w)

    async def _start_features(self) -> None:
        for f in self.features:
            await f.start()

    async def _run_pipe(self) -> int:
        from .transport import open_pipes

        def lost() -> None:
            self.stop(0)  # stdin EOF: Yate is done with us; SIGTERM follows in 30-60 ms

        # stdin is read from the first moment (an EOF must end us in any phase); what Yate
        # writes before the engine is attached waits in the engine's buffer
        reader, wt = await open_pipes(self.engine.feed, lost)
        delay = self._begin_lifecycle()
        if delay:
            why = (f"{self.name}: crashed {self.lifecycle.crashes} times in a row; waiting "
                   f"{delay:g}s before starting (see {self.lifecycle.path})")
            sys.stderr.write(why + "\n")  # Yate's console / -l log, whatever its debug level
            wt.write(p.Encoder().output(why))
            # Nothing is installed yet, so Yate has nothing to send us meanwhile.
            done, _ = await asyncio.wait([self._stop], timeout=delay)
            if done:
                return self._stop.result()
        self.engine.attach(wt.write, setlocals=self.setlocals())
        self._announce()
        if not self.config_error:
            self.engine.spawn(self._start_features(), "feature start-up")
        code = await self._stop
        self.engine.flush()
        return code

    async def _run_socket(self) -> int:
        from .transport import open_socket

        c = self.config["connection"]
        backoff = c["reconnect_min"]
        delay = self._begin_lifecycle()
        if delay:
            await asyncio.wait([self._stop], timeout=delay)
        first = True
        while not self._stop.done():
            lost_fut = asyncio.get_running_loop().create_future()

            def lost(f=lost_fut) -> None:
                if not f.done():
                    f.set_result(None)

            try:
                reader, transport = await open_socket(c["mode"], c["address"], self.engine.feed, lost)
            except OSError as e:
                sys.stderr.write(f"{self.name}: cannot connect to {c['address']}: {e}; "
                                 f"retrying in {backoff:g}s\n")
                await asyncio.wait([self._stop], timeout=backoff)
                backoff = min(backoff * 2, c["reconnect_max"])
                continue
            backoff = c["reconnect_min"]
            self.engine.attach(transport.write, role="global" if c["send_connect"] else None,
                               setlocals=self.setlocals())
            self._announce()
            if first and not self.config_error:
                self.engine.spawn(self._start_features(), "feature start-up")
                first = False
            await asyncio.wait([self._stop, lost_fut], return_when=asyncio.FIRST_COMPLETED)
            self.engine.flush()
            self.engine.detach()
            transport.close()
            if not self._stop.done():
                log.warning("connection to Yate lost; reconnecting")
                await asyncio.wait([self._stop], timeout=backoff)
        return self._stop.result()


def _engine_limits(g: dict[str, Any]) -> dict[str, Any]:
    """The Engine's timing and load settings from ``[general]`` (at start and on reload)."""
    return {"answer_within": (g["timeout"] - g["answer_margin"]) / 1000.0,
            "dispatch_timeout": g["dispatch_timeout"] / 1000.0,
            "max_in_progress": g["max_in_progress"]}


def _stdin_is_pipe() -> bool:
    import stat

    try:
        return stat.S_ISFIFO(os.fstat(0).st_mode)
    except OSError:
        return False


def run(config_path: str) -> int:
    """Entry point for pipe and socket modes; does not return (exits the process).

    The exit is immediate (``os._exit``) once the run ends: everything we acknowledged is
    already on disk, and Yate sends SIGTERM 30-60 ms after closing our stdin (reference §1.6),
    so no time is spent tearing down tasks.
    """
    # Anything printed by mistake must not corrupt the protocol stream on fd 1.
    sys.stdout = sys.stderr
    app = App(config_path)
    if app.config_error and not _stdin_is_pipe():
        # Not under Yate (a service or a terminal): say why and exit non-zero; the
        # supervisor's own back-off applies. Under Yate we stay up instead (see App.__doc__).
        sys.stderr.write(f"yate-sipgen: bad configuration:\n{app.config_error}\n")
        sys.stderr.flush()
        os._exit(2)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    profile_to = os.environ.get("YATE_SIPGEN_PROFILE")  # developers: cProfile output file
    prof = None
    if profile_to:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    try:
        code = loop.run_until_complete(app.run())
    except KeyboardInterrupt:
        code = 0
    if prof is not None:
        prof.disable()
        prof.dump_stats(profile_to)
    sys.stderr.flush()
    os._exit(code)
