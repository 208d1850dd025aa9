#!/usr/bin/env python3
"""Deliberately wrong stub: answers every message with ``1`` as the processed flag.

Yate only knows true/yes/on/enable/t and false/no/off/disable/f, so every
answer is unmatched and each message waits for its timeout (ref §5 item 2).
"""
import sys

out = sys.stdout.buffer
out.write(b"%%>setlocal:timeout:200\n%%>install:50:test.bool1\n")
out.flush()
for raw in sys.stdin.buffer:
    line = raw.rstrip(b"\n")
    if line.startswith(b"%%>message:"):
        f = line.split(b":")
        out.write(b"%%<message:" + f[1] + b":1:" + f[3] + b":" + f[4] + b"\n")
        out.flush()
