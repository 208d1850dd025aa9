"""Shared harness for the SIP events end-to-end tests (``test_e2e_events*.py``).

The real script runs behind :class:`fakeyate.FakeYate`; :class:`msg_e2e_harness.Yate` plays
ysipchan's ``xsip.generate`` (every NOTIFY the script sends is recorded, answered with the code
:attr:`Yate.xsip` chooses). ``sip.subscribe`` / ``sip.publish`` requests carry what a live Yate
6.4.1 sends (reference §6): header names lower-cased, ``xsip_dlgtag`` the To tag of our answer,
``sipheader_record-route`` only with ``initial_headers=yes``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, AsyncIterator, Optional

try:
    from fakeyate import FakeYate, YMessage
    from msg_e2e_harness import SCRIPT, Yate, params_of
except ImportError:  # pragma: no cover
    from tests.fakeyate import FakeYate, YMessage  # type: ignore[no-redef]
    from tests.msg_e2e_harness import SCRIPT, Yate, params_of  # type: ignore[no-redef]

#: An authenticated SUBSCRIBE from alice@example.com for bob's presence, out of dialog.
SUBSCRIBE: list[tuple[str, str]] = [
    ("called", "bob"), ("caller", "alice"), ("username", "alice"), ("realm", "Yate"),
    ("domain", "example.com"), ("connection_id", "general"), ("connection_reliable", "false"),
    ("username", "alice"), ("antiloop", "19"), ("ip_host", "192.0.2.7"), ("ip_port", "5080"),
    ("ip_transport", "UDP"), ("address", "192.0.2.7:5080"),
    ("sip_uri", "sip:bob@example.com"), ("sip_callid", "sub-call-1@192.0.2.7"),
    ("xsip_dlgtag", "1342317711"),
    ("sip_from", "<sip:alice@example.com>;tag=alice-tag-1"), ("sip_to", "<sip:bob@example.com>"),
    ("sip_contact", "<sip:alice@192.0.2.7:5080>"), ("sip_event", "presence"),
    ("sip_accept", "application/pidf+xml"), ("sip_expires", "600"),
    ("sip_user-agent", "softphone/1.0"),
]

PIDF_OPEN = ('<?xml version="1.0" encoding="UTF-8"?>\r\n'
             '<presence xmlns="urn:ietf:params:xml:ns:pidf" entity="sip:bob@example.com">'
             '<tuple id="t1"><status><basic>open</basic></status></tuple></presence>')

PUBLISH: list[tuple[str, str]] = [
    ("called", "bob"), ("caller", "bob"), ("username", "bob"), ("domain", "example.com"),
    ("connection_id", "general"), ("antiloop", "19"), ("ip_host", "192.0.2.9"),
    ("ip_port", "5090"), ("ip_transport", "UDP"), ("sip_uri", "sip:bob@example.com"),
    ("sip_callid", "pub-1@192.0.2.9"), ("xsip_dlgtag", "777"),
    ("sip_from", "<sip:bob@example.com>;tag=b1"), ("sip_to", "<sip:bob@example.com>"),
    ("sip_event", "presence"), ("sip_expires", "3600"),
    ("sip_content-type", "application/pidf+xml"),
    ("xsip_type", "application/pidf+xml"), ("xsip_body", PIDF_OPEN),
]


def write_conf(tmp_path: Path, sections: Optional[dict[str, dict[str, Any]]] = None) -> str:
    conf: dict[str, dict[str, Any]] = {"general": {"state_dir": "state"},
                                       "message": {"domains": "example.com"}}
    for name, values in (sections or {}).items():
        conf.setdefault(name, {}).update(values)
    lines: list[str] = []
    for name, values in conf.items():
        lines += [f"[{name}]"] + [f"{k}={v}" for k, v in values.items()] + [""]
    p = tmp_path / "sipgen.conf"
    p.write_text("\n".join(lines), encoding="utf-8")
    return str(p)


class EventsYate(Yate):
    """:class:`Yate` plus SUBSCRIBE/PUBLISH helpers."""

    async def subscribe(self, base: list[tuple[str, str]] = SUBSCRIBE, drop: tuple[str, ...] = (),
                        **over: Optional[str]) -> YMessage:
        return await self.fy.dispatch("sip.subscribe", params_of(base, drop, **over))

    async def publish(self, base: list[tuple[str, str]] = PUBLISH, drop: tuple[str, ...] = (),
                      **over: Optional[str]) -> YMessage:
        return await self.fy.dispatch("sip.publish", params_of(base, drop, **over))

    def notifies(self) -> list[YMessage]:
        return [m for m in self.xsip_seen if m.get("method") == "NOTIFY"]

    async def wait_notifies(self, count: int, timeout: float = 5.0) -> list[YMessage]:
        await self.fy.wait_until(lambda: len(self.notifies()) >= count, timeout,
                                 f"{count} NOTIFY")
        return self.notifies()


def in_dialog(answer: YMessage, **over: Optional[str]) -> dict[str, Optional[str]]:
    """Overrides making :data:`SUBSCRIBE` a refresh inside the dialog ``answer`` created."""
    tag = "1342317711"
    out: dict[str, Optional[str]] = {"sip_to": f"<sip:bob@example.com>;tag={tag}",
                                     "xsip_dlgtag": tag}
    out.update(over)
    return out


@contextlib.asynccontextmanager
async def started(tmp_path: Path, sections: Optional[dict[str, dict[str, Any]]] = None,
                  **fake_kw: Any) -> AsyncIterator[EventsYate]:
    conf = write_conf(tmp_path, sections)
    cwd = tmp_path / "yate-cwd"
    cwd.mkdir(exist_ok=True)
    fy = FakeYate(SCRIPT, conf, cwd=str(cwd), script_name="sipgen", **fake_kw)
    y = EventsYate(fy)
    await fy.start()
    try:
        await fy.wait_installed("sip.subscribe", 10)
        await subscriptions_ready(y)
        yield y
    finally:
        await fy.stop()


async def subscriptions_ready(y: EventsYate, timeout: float = 10.0) -> None:
    """The event store is open once the console lists subscriptions (restored ones too)."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while True:
        r = await y.fy.dispatch("engine.command", {"line": "sipgen subscriptions"})
        if r.handled and "store" not in r.retval:
            return
        assert time.monotonic() < deadline, r.retval
        await asyncio.sleep(0.02)
