"""Example custom handler: an echo service number for SIP MESSAGE.

A MESSAGE to ``sip:echo@<one of your domains>`` is answered 200 and its text is sent back to
the sender as a new MESSAGE from ``echo@<domain>``. Load it from sipgen.conf::

    [general]
    extensions=echo_service.py

It shows the extension API: ``setup(app)`` gets the running application; ``app.engine.handler``
adds a handler (here for ``sip.message``, ahead of the MESSAGE feature's own, which runs at
priority 50); ``app.feature("message")`` gives the MESSAGE feature, whose ``submit()`` routes and
sends a message through Yate, and whose ``is_automatic()`` says whether a request must never be
answered automatically (a notice, an isComposing or IMDN, an unauthenticated or foreign sender,
or anything marked Auto-Submitted) -- so two automatic senders can never loop.
"""

from __future__ import annotations

import logging

from yate_sipgen.sip import media_type, parse_name_addr, parse_uri

SERVICE_USER = "echo"

log = logging.getLogger("yate_sipgen.echo")


def setup(app) -> None:
    messages = app.feature("message")
    if messages is None:
        raise RuntimeError("the echo service needs the MESSAGE feature ([message] enable=true)")

    @app.engine.handler("sip.message", priority=10, owner="echo")
    async def echo(msg) -> bool:
        ruri = parse_uri(msg.get("sip_uri", ""))
        if ruri is None or ruri.user != SERVICE_USER or not messages.serves(ruri.host):
            return False  # not for us: the MESSAGE feature handles (or refuses) it
        msg["code"] = "200"
        app.engine.answer_now(msg)  # answer first: the reply is a separate request
        if messages.is_automatic(msg) or media_type(msg.get("xsip_type", "")) not in (
                "text/plain", "text/html"):
            return True  # never answer notices, isComposing, IMDN, strangers or other robots
        frm = parse_name_addr(msg.get("sip_from", ""))
        if frm is None:
            return True
        sender = f"{msg.get('username') or frm.uri.user}@{frm.uri.host}"
        code = await messages.submit(f"{SERVICE_USER}@{ruri.host}", sender,
                                     msg.get("sip_content-type") or msg.get("xsip_type"),
                                     msg.get("xsip_body", ""), display="Echo")
        log.info("echoed a message back to %s: %d", sender, code)
        return True
