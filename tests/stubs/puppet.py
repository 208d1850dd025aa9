#!/usr/bin/env python3
"""Plan-driven extmodule stub used by tests/test_fakeyate.py.

argv[1] (ONE argument, as Yate passes it) is a JSON object:

    {"steps": [[op, arg], ...], "auto": "<answer template>" or null}

Steps run in order on the main thread; a reader thread records every stdin
line.  With "auto", every ``%%>message`` received is answered at once with the
template, where ``{id}``, ``{name}`` and ``{retval}`` are replaced by the raw
(still escaped) fields of the request.  The script is deliberately naive: it
writes exactly what the plan says, right or wrong.

Ops:
  send TEXT          write TEXT + "\\n"
  sendraw TEXT       write TEXT without newline
  expect PREFIX      wait for a stdin line starting with PREFIX (after the last expect)
  answer_next TPL    wait for the next %%>message and answer it with TPL
  answer_again TPL   answer the message of the last answer_next again with TPL
  touch_or_skip PATH if PATH exists skip the remaining steps, else create it
  sleep SECONDS      sleep
  stderr TEXT        write TEXT + "\\n" to stderr
  report null        write a JSON report (argv, cwd, signals, fds) to stderr
  close_stdout null  close fd 1
  exit CODE          exit now with CODE
  hang null          ignore stdin EOF and sleep until killed
After the last step: wait for stdin EOF, then exit 0.
With an empty argument the puppet only writes its report and waits for EOF.
"""
import json
import os
import signal
import sys
import threading
import time

PLAN = json.loads(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] else {}
AUTO = PLAN.get("auto")
OUT = sys.stdout.buffer
WLOCK = threading.Lock()
COND = threading.Condition()
LINES = []
STATE = {"eof": False, "cursor": 0, "msg_cursor": 0, "last_msg": None}


def enc(text):
    return text.encode("utf-8", "surrogateescape")


def write(data):
    with WLOCK:
        try:
            OUT.write(data)
            OUT.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass


def fill(template, line):
    fields = line.split(b":")
    mid, name, retval = fields[1], fields[3], fields[4]
    return enc(template).replace(b"{id}", mid).replace(b"{name}", name).replace(b"{retval}", retval)


def reader():
    for raw in sys.stdin.buffer:
        line = raw.rstrip(b"\n")
        if AUTO is not None and line.startswith(b"%%>message:"):
            write(fill(AUTO, line) + b"\n")
        with COND:
            LINES.append(line)
            COND.notify_all()
    with COND:
        STATE["eof"] = True
        COND.notify_all()


def wait_for(pred, what):
    deadline = time.monotonic() + 10
    with COND:
        while True:
            r = pred()
            if r is not None:
                return r
            if STATE["eof"] or time.monotonic() > deadline:
                sys.stderr.write("puppet: gave up waiting for %s\n" % what)
                sys.stderr.flush()
                os._exit(3)
            COND.wait(0.05)


def find_from(key, test):
    def pred():
        for i in range(STATE[key], len(LINES)):
            if test(LINES[i]):
                STATE[key] = i + 1
                return LINES[i]
        return None
    return pred


def report():
    fds = sorted(int(x) for x in os.listdir("/proc/self/fd"))
    info = {
        "argv": sys.argv,
        "cwd": os.getcwd(),
        "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
        "sigquit_ignored": signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN,
        "sigterm_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        "fds": fds,
        "env_marker": os.environ.get("FAKEYATE_MARKER"),
    }
    sys.stderr.write("REPORT " + json.dumps(info) + "\n")
    sys.stderr.flush()


def main():
    threading.Thread(target=reader, daemon=True).start()
    if not PLAN:  # no argument (Yate passes ""): just report and wait for EOF
        report()
    for op, arg in PLAN.get("steps", []):
        if op == "send":
            write(enc(arg) + b"\n")
        elif op == "sendraw":
            write(enc(arg))
        elif op == "expect":
            wait_for(find_from("cursor", lambda l, p=enc(arg): l.startswith(p)), arg)
        elif op == "answer_next":
            line = wait_for(find_from("msg_cursor", lambda l: l.startswith(b"%%>message:")), "a message")
            STATE["last_msg"] = line
            write(fill(arg, line) + b"\n")
        elif op == "answer_again":
            write(fill(arg, STATE["last_msg"]) + b"\n")
        elif op == "touch_or_skip":
            if os.path.exists(arg):
                break
            open(arg, "w").close()
        elif op == "sleep":
            time.sleep(arg)
        elif op == "stderr":
            sys.stderr.write(arg + "\n")
            sys.stderr.flush()
        elif op == "report":
            report()
        elif op == "close_stdout":
            os.close(1)
        elif op == "exit":
            os._exit(arg)
        elif op == "hang":
            while True:
                time.sleep(1)
        else:
            sys.stderr.write("puppet: unknown op %r\n" % op)
            os._exit(4)
    with COND:
        while not STATE["eof"]:
            COND.wait(0.05)
    os._exit(0)


if __name__ == "__main__":
    main()
