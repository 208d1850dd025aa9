"""sipgen.conf: a Yate-style INI file, and its schema in one table.

Format (as Yate's own ``.conf`` files): ``[section]`` headers, ``key=value`` lines (split at the
first ``=``, both sides trimmed), comments on lines starting with ``;`` or ``#``. Booleans take
Yate's words (``true/yes/on/enable`` and ``false/no/off/disable``).

Under Yate the file path is argv[1] and the working directory is Yate's, so relative paths
*inside* the file resolve against the file's own directory.

Every key is declared once (section, key, type, default, doc) by the module that uses it, in
its own :class:`Declarations` (the engine's in :data:`CORE`, each feature's next to its code);
the app assembles them into one :class:`Schema` (``yate_sipgen.features.schema()``). This
module knows no feature. The loader checks values against the schema, warns about unknown
sections and keys, and ``examples/sipgen.conf`` is tested against it so that it documents
every key with its default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")
_TRUE = ("true", "yes", "on", "enable", "t")
_FALSE = ("false", "no", "off", "disable", "f")


@dataclass(frozen=True)
class Key:
    section: str
    name: str
    kind: str  # int, float, bool, str, choice, list, path
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def allowed(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind in ("int", "float"):
            lo = "" if self.minimum is None else f" >= {self.minimum:g}"
            hi = "" if self.maximum is None else f" <= {self.maximum:g}"
            return f"a{'n integer' if self.kind == 'int' else ' number'}{lo}{' and' if lo and hi else ''}{hi}"
        if self.kind == "list":
            return "a comma-separated list"
        return "text"

    def parse(self, raw: str, base_dir: str) -> Any:
        raw = raw.strip()
        k = self.kind
        if k == "bool":  # case-sensitive, as Yate's String::toBoolean
            if raw in _TRUE:
                return True
            if raw in _FALSE:
                return False
            raise ValueError
        if k in ("int", "float"):
            if not _NUMBER.fullmatch(raw) or (k == "int" and not raw.lstrip("-").isdigit()):
                raise ValueError
            v: float = int(raw, 10) if k == "int" else float(raw)
            if (self.minimum is not None and v < self.minimum) or (
                    self.maximum is not None and v > self.maximum):
                raise ValueError
            return v
        if k == "choice":
            if raw not in self.choices:
                raise ValueError
            return raw
        if k == "list":
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if k == "path":
            if not raw:
                return ""
            return raw if os.path.isabs(raw) else os.path.normpath(os.path.join(base_dir, raw))
        return raw

    def show(self, value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple):
            return ",".join(value)
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)


Check = Callable[["Config"], list[str]]


@dataclass
class Declarations:
    """What one module declares: keys, a paragraph per section, cross-key checks (each returns
    error strings; it may also append to ``cfg.warnings``)."""

    keys: list[Key] = field(default_factory=list)
    docs: dict[str, str] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    def key(self, section: str, name: str, kind: str, default: Any, doc: str,
            **kw: Any) -> None:
        self.keys.append(Key(section, name, kind, default, doc, **kw))


class Schema:
    """Every key the running program knows, assembled from :class:`Declarations`."""

    def __init__(self, parts: "list[Declarations]") -> None:
        self.keys: list[Key] = []
        self.docs: dict[str, str] = {}
        self.checks: list[Check] = []
        seen: set[tuple[str, str]] = set()
        for part in parts:
            for k in part.keys:
                if (k.section, k.name) in seen:
                    raise ValueError(f"config key [{k.section}] {k.name} declared twice")
                seen.add((k.section, k.name))
                self.keys.append(k)
            self.docs.update(part.docs)
            self.checks.extend(part.checks)

    def sections(self) -> list[str]:
        out: list[str] = []
        for k in self.keys:
            if k.section not in out:
                out.append(k.section)
        return out


#: The engine's own keys ([general], [connection]).
CORE = Declarations()
key = CORE.key


# [general] -- the engine --------------------------------------------------------------------
key("general", "timeout", "int", 10000,
    "Yate's answer timeout for this script in ms (setlocal timeout). Yate releases a message "
    "we have not answered after this long; keep it well below a SIP sender's 32 s Timer F.",
    minimum=1000, maximum=30000)
key("general", "answer_margin", "int", 1000,
    "We answer every message at the latest this many ms before Yate's timeout.",
    minimum=100, maximum=10000)
key("general", "dispatch_timeout", "int", 10000,
    "Default ms to wait for Yate's answer to a message we dispatch.", minimum=100, maximum=60000)
key("general", "max_in_progress", "int", 2000,
    "Messages handled at once; past this a sip.* request gets 503 with Retry-After at once.",
    minimum=1, maximum=10000)
key("general", "maxqueue", "int", 5000,
    "Yate's limit of unanswered messages queued to this script (setlocal maxqueue, 0-10000). "
    "Keep it above max_in_progress so overload gets our 503, not Yate's silent refusal.",
    minimum=0, maximum=10000)
key("general", "restart", "bool", True,
    "Let Yate respawn the script when it exits or crashes (setlocal restart). Crash loops back "
    "off using a counter kept in state_dir.")
key("general", "state_dir", "path", "state",
    "Directory for the script's own state (crash counter, databases by default). Relative to "
    "this file's directory.")
key("general", "extensions", "list", (),
    "Python files (comma-separated, relative to this file) loaded at start; each defines "
    "setup(app) to add handlers or console commands. See examples/echo_service.py.")
key("general", "name", "str", "sipgen",
    "Name used in Yate's console: 'status NAME', 'NAME stats', 'reload NAME'.")

# [connection] -- how we reach Yate ----------------------------------------------------------
key("connection", "mode", "choice", "pipe",
    "pipe: started by Yate from extmodule.conf [scripts] (stdin/stdout). tcp or unix: run as a "
    "separate service connecting to an extmodule [listener].", choices=("pipe", "tcp", "unix"))
key("connection", "address", "str", "",
    "tcp: host:port of the listener (e.g. 127.0.0.1:5040); unix: path of its socket.")
key("connection", "send_connect", "bool", True,
    "Socket modes: send %%>connect:global first (needed when the listener has no role=).")
key("connection", "reconnect_min", "float", 1.0,
    "Socket modes: first reconnect delay in seconds (doubles up to reconnect_max).",
    minimum=0.05, maximum=60)
key("connection", "reconnect_max", "float", 30.0,
    "Socket modes: longest reconnect delay in seconds.", minimum=0.1, maximum=600)


@dataclass
class Config:
    """A validated configuration: ``cfg["section"]["key"]`` gives typed values."""

    path: str
    base_dir: str
    values: dict[str, dict[str, Any]]
    schema: Schema
    warnings: list[str] = field(default_factory=list)
    sections_seen: set[str] = field(default_factory=set)

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]

    def effective(self) -> list[str]:
        """``[section]`` / ``key=value`` lines of every setting, defaults included."""
        out: list[str] = []
        for section in self.schema.sections():
            out.append(f"[{section}]")
            for k in self.schema.keys:
                if k.section == section:
                    out.append(f"{k.name}={k.show(self.values[section][k.name])}")
            out.append("")
        return out


def defaults(schema: Schema, base_dir: str = ".") -> Config:
    values: dict[str, dict[str, Any]] = {s: {} for s in schema.sections()}
    for k in schema.keys:
        values[k.section][k.name] = k.parse(k.show(k.default), base_dir) if k.kind == "path" else k.default
    return Config("", os.path.abspath(base_dir), values, schema)


def parse_text(text: str, schema: Schema, path: str = "<text>") -> Config:
    """Parse and validate; raises :class:`ConfigError` listing every error found."""
    base_dir = os.path.dirname(os.path.abspath(path)) if path != "<text>" else os.getcwd()
    cfg = defaults(schema, base_dir)
    cfg.path = path
    known: dict[tuple[str, str], Key] = {(k.section, k.name): k for k in schema.keys}
    known_sections = set(schema.sections())
    errors: list[str] = []
    section: str | None = None
    bad_section = False
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s[0] in ";#":
            continue
        where = f"{path}:{lineno}"
        if s.startswith("["):
            if not s.endswith("]") or len(s) < 3:
                errors.append(f"{where}: malformed section header {s!r}")
                section, bad_section = None, True
                continue
            section, bad_section = s[1:-1].strip(), False
            cfg.sections_seen.add(section)
            if section not in known_sections and not _is_extension_section(section):
                cfg.warnings.append(f"{where}: unknown section [{section}] ignored "
                                    f"(known: {', '.join(sorted(known_sections))})")
            continue
        name, sep, raw = s.partition("=")
        name = name.strip()
        if not sep or not name:
            errors.append(f"{where}: expected key=value, got {s!r}")
            continue
        if section is None:
            if not bad_section:
                errors.append(f"{where}: {name}= appears before any [section]")
            continue
        k = known.get((section, name))
        if k is None:
            if section in known_sections:
                names = ", ".join(x.name for x in schema.keys if x.section == section)
                cfg.warnings.append(f"{where}: unknown key {name} in [{section}] ignored "
                                    f"(known: {names})")
            elif _is_extension_section(section):
                cfg.values.setdefault(section, {})[name] = raw.strip()
            continue
        try:
            cfg.values[section][name] = k.parse(raw, base_dir)
        except ValueError:
            errors.append(f"{where}: [{section}] {name}={raw.strip()!r} is invalid: "
                          f"expected {k.allowed()}")
    for check in schema.checks:
        errors.extend(check(cfg))
    if errors:
        raise ConfigError("\n".join(errors + [f"warning: {w}" for w in cfg.warnings]))
    return cfg


def load(path: str, schema: Schema) -> Config:
    """Read and validate ``path``; an empty path gives the defaults (relative to the cwd)."""
    if not path:
        cfg = defaults(schema, os.getcwd())
        cfg.warnings.append("no configuration file given: using the defaults")
        return cfg
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse_text(text, schema, path)


#: Sections whose keys are free-form (e.g. ``[service echo]``): values kept as text.
EXTENSION_PREFIXES: list[str] = []


def _is_extension_section(section: str) -> bool:
    return any(section.startswith(pfx) for pfx in EXTENSION_PREFIXES)


def _check_general(cfg: Config) -> list[str]:
    g = cfg["general"]
    errs = []
    if g["answer_margin"] >= g["timeout"]:
        errs.append(f"{cfg.path}: [general] answer_margin={g['answer_margin']} must be below "
                    f"timeout={g['timeout']}")
    g_ext = []
    for ext in g["extensions"]:
        path = ext if os.path.isabs(ext) else os.path.normpath(os.path.join(cfg.base_dir, ext))
        if not os.path.isfile(path):
            errs.append(f"{cfg.path}: [general] extensions: {ext} ({path}) is not a file")
        g_ext.append(path)
    g["extensions"] = tuple(g_ext)
    c = cfg["connection"]
    if c["mode"] != "pipe" and not c["address"]:
        errs.append(f"{cfg.path}: [connection] mode={c['mode']} needs address=")
    if c["reconnect_min"] > c["reconnect_max"]:
        errs.append(f"{cfg.path}: [connection] reconnect_min={c['reconnect_min']:g} must not "
                    f"exceed reconnect_max={c['reconnect_max']:g}")
    if g["maxqueue"] and g["maxqueue"] <= g["max_in_progress"]:
        cfg.warnings.append(f"{cfg.path}: [general] maxqueue={g['maxqueue']} is not above "
                            f"max_in_progress={g['max_in_progress']}: Yate will refuse messages "
                            "silently before we can answer 503")
    if c["mode"] == "tcp" and c["address"]:
        host, _, port = c["address"].rpartition(":")
        if not host or not port.isdigit():
            errs.append(f"{cfg.path}: [connection] address={c['address']!r} must be host:port")
    return errs


CORE.checks.append(_check_general)
CORE.docs.update({
    "general": "The engine: timeouts, limits, restart behaviour, state directory, console name.",
    "connection": "How yate-sipgen reaches Yate: started by Yate itself (mode=pipe, the usual "
                  "way), or run as a separate service that connects to an extmodule.conf "
                  "[listener] (tcp, unix).",
})


def _wrap(text: str, width: int = 96) -> list[str]:
    import textwrap

    return ["; " + ln for ln in textwrap.wrap(text, width - 2)]


def render_example(schema: Schema, header: str, trailers: dict[str, str] | None = None) -> str:
    """``examples/sipgen.conf``: every key with its doc and its default, section by section."""
    out = [header.rstrip("\n"), ""]
    for section in schema.sections():
        out += ["", f"[{section}]"]
        if section in schema.docs:
            out += _wrap(schema.docs[section])
        out.append("")
        for k in schema.keys:
            if k.section != section:
                continue
            allowed = k.allowed() if k.kind != "path" else "a path"
            out += [f"; {k.name}: {allowed}"] + _wrap(k.doc)
            out += [f"{k.name}={k.show(k.default)}", ""]
        if trailers and section in trailers:
            out += [trailers[section].rstrip("\n")]
    return "\n".join(out).rstrip("\n") + "\n"
