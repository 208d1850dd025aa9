#!/usr/bin/env python3
"""Deliberately wrong stub: installs handlers and never answers anything.

argv[1] is a comma-separated list of setlocal settings to send first, e.g.
``timeout:150,maxqueue:2``.  It installs ``test.slow`` and exits on stdin EOF.
"""
import sys

out = sys.stdout.buffer
arg = sys.argv[1] if len(sys.argv) > 1 else ""
for item in filter(None, arg.split(",")):
    out.write(b"%%>setlocal:" + item.encode() + b"\n")
out.write(b"%%>install:100:test.slow\n")
out.flush()
for _ in sys.stdin.buffer:
    pass
