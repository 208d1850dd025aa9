"""Yate console integration: ``status sipgen``, ``sipgen ...`` commands, help, reload, debug.

Conventions follow Yate's own ``Module`` class (reference §4.2):

* ``engine.status``: with ``module`` empty (the overview) append our line and return false so
  every module adds its own; with ``module`` equal to our name append it and return true.
  Line format: ``name=<n>,type=misc;<k>=<v>,...[;<details>]\\r\\n``.
* ``engine.command``: ``line`` starting with our name runs a subcommand; the text goes in the
  retval (lines ending ``\\r\\n``). Tab completion (``partline``/``partword``) appends
  tab-separated words to the retval and returns false.
* ``engine.help``: broadcast (no ``line``) appends a usage line; ``line`` = our name gives the
  full text.
* ``engine.init``: reload our config when ``plugin`` is empty or our name.
* ``engine.debug``: ``debug sipgen level N|on|off``.

Output longer than what fits in one answer line is paged: the first page is shown with a hint,
``sipgen more`` shows the next.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import protocol as p
from .message import Message

log = logging.getLogger("yate_sipgen.console")

CommandFunc = Callable[[list[str]], "str | Awaitable[str]"]


@dataclass
class Command:
    name: str
    usage: str
    help: str
    func: CommandFunc
    complete: Callable[[list[str]], list[str]] | None = None


class Console:
    """Registers the console handlers on an engine; features add ``sipgen`` subcommands."""

    def __init__(self, engine, name: str, status_info: Callable[[], dict[str, object]],
                 on_reload: Callable[[], Awaitable[str]], on_debug: Callable[[int], None]) -> None:
        self.engine = engine
        self.name = name
        self.status_info = status_info
        self.on_reload = on_reload
        self.on_debug = on_debug
        self.commands: dict[str, Command] = {}
        self._pages: list[str] = []
        self.debug_level = 5
        engine.add_handler("engine.status", self._status, priority=100, owner="console")
        engine.add_handler("engine.command", self._command, priority=100, owner="console")
        engine.add_handler("engine.help", self._help, priority=100, owner="console")
        engine.add_handler("engine.init", self._init, priority=100, owner="console")
        engine.add_handler("engine.debug", self._debug, priority=100, owner="console")
        self.command("stats", "", "show every counter, one per line")(self._stats_cmd)
        self.command("more", "", "show the next page of the last long output")(self._more_cmd)

    def command(self, name: str, usage: str, help: str,
                complete: Callable[[list[str]], list[str]] | None = None):
        """Decorator: add ``<name> <sub> ...``; the function gets the words after ``sub``."""

        def deco(func: CommandFunc) -> CommandFunc:
            self.commands[name] = Command(name, usage, help, func, complete)
            return func

        return deco

    # -- engine.status -------------------------------------------------------------------------
    def status_line(self, details: bool = True) -> str:
        info = self.status_info()
        head = ",".join(f"{k}={v}" for k, v in info.items())
        line = f"name={self.name},type=misc;{head}"
        if details:
            rows = self.engine.stats.details()
            if rows:
                line += ";" + ",".join(f"{k}={v}" for k, v in rows)
        return line + "\r\n"

    def _status(self, msg: Message) -> bool:
        module = msg.get("module", "")
        if module and module != self.name and module != "misc":
            return False
        msg.retval = msg.retval + self.status_line(msg.get("details", "true") != "false")
        return module == self.name

    # -- engine.command ------------------------------------------------------------------------
    def _complete(self, msg: Message) -> bool:
        partline = msg.get("partline", "")
        partword = msg.get("partword", "")
        words: list[str] = []
        if partline in ("", "help", "status", "debug", "reload"):
            words = [self.name]
        elif partline == self.name:
            words = sorted(self.commands)
        else:
            parts = partline.split()
            if len(parts) >= 2 and parts[0] == self.name and parts[1] in self.commands:
                comp = self.commands[parts[1]].complete
                if comp is not None:
                    words = comp(parts[2:])
        for w in words:
            if w.startswith(partword):
                msg.retval = msg.retval + "\t" + w
        return False

    async def _command(self, msg: Message) -> bool:
        if "partline" in msg or "partword" in msg:
            return self._complete(msg)
        line = msg.get("line", "").strip()
        words = line.split()
        if not words or words[0] != self.name:
            return False
        if len(words) == 1:
            text = self.usage_text()
        else:
            cmd = self.commands.get(words[1])
            if cmd is None:
                text = f"Unknown command '{words[1]}'.\r\n" + self.usage_text()
            else:
                if cmd.name != "more":
                    self._pages = []
                try:
                    r = cmd.func(words[2:])
                    text = await r if inspect.isawaitable(r) else r
                except Exception as e:  # a command failing must still answer the operator
                    log.exception("command %r failed", line)
                    text = f"{self.name} {words[1]} failed: {e}"
        msg.retval = self.paged(_crlf(text), msg)
        return True

    def paged(self, text: str, msg: Message) -> str:
        """Fit ``text`` in one answer line; keep the rest for ``sipgen more``."""
        budget = self._budget(msg)
        if p.escaped_size(text) <= budget:
            return text
        pages: list[str] = []
        cur = ""
        hint = f"-- more: '{self.name} more' --\r\n"
        room = budget - p.escaped_size(hint)
        for ln in text.splitlines(keepends=True):
            while p.escaped_size(ln) > room:  # one enormous line: cut it
                cut = max(1, room // 4)
                pages.append(cur) if cur else None
                cur = ""
                pages.append(ln[:cut] + "\r\n")
                ln = ln[cut:]
            if p.escaped_size(cur) + p.escaped_size(ln) > room:
                pages.append(cur)
                cur = ""
            cur += ln
        if cur:
            pages.append(cur)
        self._pages = pages[1:]
        return pages[0] + (hint if self._pages else "")

    def _budget(self, msg: Message) -> int:
        s = self.engine.session
        limit = s.encoder.max_line if s is not None else 8190
        # the answer carries the id, name, the changed params; keep a safe margin
        return limit - 512 - p.escaped_size(msg.id)

    def _more_cmd(self, args: list[str]) -> str:
        if not self._pages:
            return "Nothing more to show.\r\n"
        page = self._pages.pop(0)
        if self._pages:
            page += f"-- more: '{self.name} more' --\r\n"
        return page

    def _stats_cmd(self, args: list[str]) -> str:
        rows = list(self.status_info().items()) + self.engine.stats.details()
        return "".join(f"{k}={v}\r\n" for k, v in rows)

    def usage_text(self) -> str:
        lines = [f"  {self.name} {c.name}{' ' + c.usage if c.usage else ''}\r\n"
                 f"    {c.help}\r\n" for c in sorted(self.commands.values(), key=lambda c: c.name)]
        return f"Commands of {self.name}:\r\n" + "".join(lines)

    # -- engine.help ---------------------------------------------------------------------------
    def _help(self, msg: Message) -> bool:
        line = msg.get("line", "")
        if not line:
            subs = "|".join(sorted(self.commands))
            msg.retval = msg.retval + f"  {self.name} {{{subs}}} [args...]\r\n"
            return False
        if line == self.name:
            msg.retval = msg.retval + self.usage_text()
            return True
        return False

    # -- engine.init, engine.debug ------------------------------------------------------------
    def _init(self, msg: Message) -> bool:
        plugin = msg.get("plugin", "")
        if plugin in ("", self.name):
            self.engine.spawn(self.on_reload(), "config reload")
        return False

    def _debug(self, msg: Message) -> bool:
        if msg.get("module", "") != self.name:
            return False
        words = msg.get("line", "").split()
        level = self.debug_level
        if words[:1] == ["level"] and len(words) > 1 and words[1].lstrip("-").isdigit():
            level = min(max(int(words[1]), 1), 10)
        elif words[:1] in (["on"], ["true"], ["enable"]):
            level = max(level, 9)
        elif words[:1] in (["off"], ["false"], ["disable"]):
            level = 5
        self.on_debug(level)
        msg.retval = msg.retval + f"Module {self.name} debug on level {level}\r\n"
        return True


def _crlf(text: str) -> str:
    if not text:
        return ""
    text = text.replace("\r\n", "\n").replace("\n", "\r\n")
    return text if text.endswith("\r\n") else text + "\r\n"
