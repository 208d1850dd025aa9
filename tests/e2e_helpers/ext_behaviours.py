"""Test extension for tests/test_e2e_engine.py: handlers and commands that misbehave on purpose.

Loaded by the real script through ``[general] extensions=`` (``setup(app)``). Nothing here
reaches into the script's internals beyond the documented extension API: ``app.engine.handler``
and ``app.console.command``.
"""

import asyncio
import logging

log = logging.getLogger("yate_sipgen.ext_test")

#: what the ``big`` command prints: ~104 KB, every line numbered so pages can be checked
BIG_TEXT = "".join(f"line {i:05d} " + "x" * 40 + "\r\n" for i in range(2000))


def setup(app):
    eng = app.engine

    @eng.handler("sip.slow")
    async def slow(msg):
        # sleeps ``sleep`` seconds (default 50 ms), then handles the message
        delay = float(msg.get("sleep", "0.05"))
        await asyncio.sleep(delay)
        msg["slept"] = str(delay)
        return True

    @eng.handler("sip.raise")
    async def sip_raise(msg):
        msg["half_done"] = "yes"
        raise RuntimeError("boom (async, sip)")

    @eng.handler("sip.raisesync")
    def sip_raise_sync(msg):
        msg["half_done"] = "yes"
        raise RuntimeError("boom (sync, sip)")

    @eng.handler("test.raise")
    async def test_raise(msg):
        msg["tampered"] = "yes"
        msg.retval = "changed"
        raise RuntimeError("boom (async, not sip)")

    @eng.handler("sip.echo")
    async def echo(msg):
        big = msg.get("big", "")
        msg["size"] = str(len(big))
        if msg.get("echo") == "yes":
            msg["copy"] = big  # far too long for one answer line
        return True

    @eng.handler("sip.badparam")
    async def bad_param(msg):
        # a param name Yate cannot take back ('=' in it): the answer cannot be encoded as is
        msg["bad=name"] = "x"
        return True

    @eng.handler("sip.badparamsync")
    def bad_param_sync(msg):
        msg["bad=name"] = "x"
        return True

    @app.console.command("ping", "", "dispatch 3 test.ping to Yate at once, then enqueue test.fire")
    async def ping(args):
        from yate_sipgen.message import Message

        msgs = [Message("test.ping", {"n": str(i)}) for i in range(3)]
        results = await asyncio.gather(*(eng.dispatch(m, timeout=1.0) for m in msgs),
                                       return_exceptions=True)
        out = []
        for m, r in zip(msgs, results):
            if isinstance(r, BaseException):
                out.append(f"n={m['n']},error={type(r).__name__}")
            else:
                out.append(f"n={r.get('n')},handled={r.handled},pong={r.get('pong')}")
        eng.enqueue(Message("test.fire", {"x": "1"}))
        return "\r\n".join(out)

    @app.console.command("big", "", "print about 100 KB of numbered lines")
    def big(args):
        return BIG_TEXT

    @app.console.command("log", "", "log unsafe text at every level")
    def logcmd(args):
        log.error("E-unsafe a\r\nb\x1b[31m c\x07")
        log.warning("W-unsafe a\r\nb\x1b[31m")
        log.info("I-info line")
        log.debug("D-debug line")
        return "logged\r\n"
