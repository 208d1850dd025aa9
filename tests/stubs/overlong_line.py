#!/usr/bin/env python3
"""Deliberately wrong stub: writes one line longer than Yate's buffer allows.

argv[1] is the payload length (default 8191, one over bufsize-2 = 8190).
Afterwards it ignores stdin EOF and sleeps, so only Yate's SIGTERM ends it.
"""
import sys
import time

n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] else 8191
out = sys.stdout.buffer
out.write(b"%%>output:before\n")
line = b"%%>output:" + b"x" * (n - len(b"%%>output:"))
out.write(line + b"\n")
out.write(b"%%>output:after\n")
out.flush()
while True:
    time.sleep(1)
