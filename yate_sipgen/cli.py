"""Command line: ``yate-sipgen [CONF]``, ``--config CONF``, ``--check CONF``.

Yate runs the script as ``yate-sipgen <arg>`` with the ``[scripts]`` value as one argument
(``""`` when there is none). ``--check`` validates a file the way ``nginx -t`` does: it prints the
effective settings and the Yate-side configuration the service needs, and exits non-zero on
errors.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import config as config_mod
from .errors import ConfigError


def _script_path() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cand = os.path.join(here, "scripts", "yate-sipgen")
    return cand if os.path.exists(cand) else "yate-sipgen"


def yate_snippets(cfg: config_mod.Config) -> str:
    """The extmodule.conf / ysipchan.conf lines this configuration needs."""
    from .features import feature_classes

    methods: dict[str, str] = {}
    notes: list[str] = []
    sections: dict[str, list[str]] = {}
    yate_general: list[str] = []
    for cls in feature_classes():
        yate_general.extend(getattr(cls, "yate_general", lambda c: [])(cfg))
        methods.update(getattr(cls, "sip_methods", lambda c: {})(cfg))
        notes.extend(getattr(cls, "yate_notes", lambda c: [])(cfg))
        for name, lines in getattr(cls, "ysipchan_sections", lambda c: {})(cfg).items():
            sections.setdefault(name, []).extend(lines)
    conf = os.path.abspath(cfg.path) if cfg.path else ""
    c = cfg["connection"]
    out = ["; --- extmodule.conf ---"]
    if c["mode"] == "pipe":
        out += ["[scripts]", f"{_script_path()}={conf}"]
    else:
        kind = c["mode"]
        out += [f"[listener {cfg['general']['name']}]", f"type={kind}"]
        if kind == "tcp":
            host, _, port = c["address"].rpartition(":")
            out += [f"addr={host}", f"port={port}"]
        else:
            out += [f"path={c['address']}"]
        if not c["send_connect"]:
            out += ["role=global"]
    if yate_general:
        out += ["", "; --- yate.conf ---", "[general]"] + yate_general
    out += ["", "; --- ysipchan.conf ---", "[general]",
            "; xsip.generate is how we send SIP requests; read only when Yate starts",
            "generate=true",
            "; one Yate thread per request, so a slow answer stalls nothing",
            "async_generic=true"] + sections.pop("general", [])
    for name, lines in sections.items():
        out += ["", f"[{name}]"] + lines
    if methods:
        out += ["", "[methods]",
                "; value = challenge for authentication (yes: Yate authenticates, we get 'username')"]
        out += [f"{m}={v}" for m, v in sorted(methods.items())]
    out += [f"; {n}" for n in notes]
    return "\n".join(out) + "\n"


def check(path: str) -> int:
    try:
        from .features import schema

        cfg = config_mod.load(path, schema())
    except ConfigError as e:
        print(f"{path}: configuration is INVALID:", file=sys.stderr)
        print(str(e), file=sys.stderr)
        return 1
    for w in cfg.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"; effective settings of {path}")
    print("\n".join(cfg.effective()))
    print("; Yate-side configuration this needs:")
    print(yate_snippets(cfg))
    print(f"{path}: configuration is valid", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="yate-sipgen", description=__doc__.split("\n")[0])
    ap.add_argument("conf", nargs="?", default="",
                    help="sipgen.conf path (this is what Yate passes from extmodule.conf [scripts])")
    ap.add_argument("--config", help="sipgen.conf path (for command-line use)")
    ap.add_argument("--check", metavar="CONF", help="validate CONF, print settings and Yate snippets")
    ns = ap.parse_args(args)
    if ns.check:
        return check(ns.check)
    from .app import run

    return run(ns.config or ns.conf)
