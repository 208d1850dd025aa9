#!/usr/bin/env python3
"""A small, naive but correct extmodule script (its own tiny codec).

It installs ``test.echo`` (priority 50, filtered on ``kind=echo``), watches
``test.watched``, answers every ``%%>message`` with true, adding
``answered_by=naive`` and the raw param count, emits one ``naive.hello``
message with an id (``greeting=x:y``, escaped), logs with %%>debug
and exits cleanly on stdin EOF.
"""
import sys

out = sys.stdout.buffer


def esc(b, extra=None):
    r = bytearray()
    for c in b:
        if c < 0x20 or c == 0x3A or (extra is not None and c == extra):
            r += bytes((0x25, c + 0x40))
        elif c == 0x25:
            r += b"%%"
        else:
            r.append(c)
    return bytes(r)


def unesc(b, extra=None):
    r = bytearray()
    i = 0
    while i < len(b):
        c = b[i]
        if c == 0x25:
            d = b[i + 1]
            if d == 0x25:
                r.append(0x25)
            elif extra is not None and d == extra + 0x40:
                r.append(extra)
            else:
                r.append(d - 0x40 if d != 0x7A else 0x3A)
            i += 2
        else:
            r.append(c)
            i += 1
    return bytes(r)


def send(line):
    out.write(line + b"\n")
    out.flush()


send(b"%%>setlocal:trackparam:naive")
send(b"%%>install:50:test.echo:kind:echo")
send(b"%%>watch:test.watched")
send(b"%%>debug:5:naive started%J2nd line")
send(b"%%>message:naive.1:0:naive.hello::greeting=" + esc(b"x:y"))
for raw in sys.stdin.buffer:
    line = raw.rstrip(b"\n")
    if line.startswith(b"%%>message:"):
        f = line.split(b":")
        params = [p for p in f[5:] if p]
        send(b"%%<message:" + f[1] + b":true:" + f[3] + b":" + f[4]
             + b":answered_by=naive:nparams=" + str(len(params)).encode())
    elif line.startswith(b"%%<message:naive.1:"):
        send(b"%%>output:got answer " + line[len(b"%%<message:naive.1:"):].split(b":")[0])
