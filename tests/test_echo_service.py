"""The example extension examples/echo_service.py, run as an operator would load it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

try:
    from msg_e2e_harness import assert_clean, run, started
except ImportError:  # pragma: no cover - tests/ turned into a package
    from tests.msg_e2e_harness import assert_clean, run, started  # type: ignore

ECHO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "examples", "echo_service.py")
ALICE_URI = "sip:alice@192.0.2.7:5080"


def test_a_message_to_echo_is_answered_200_and_sent_back_to_the_sender(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, general={"extensions": ECHO}) as y:
            y.register_contact("alice@example.com", ALICE_URI)
            r = await y.message(called="echo", sip_uri="sip:echo@example.com",
                                sip_to="<sip:echo@example.com>")
            assert r.handled and r.get("code") == "200"
            (x,) = await y.wait_xsip(1)
            assert x.get("uri") == ALICE_URI
            assert x.get("xsip_body") == "hello bob\r\n"
            assert x.get("sip_From").startswith('"Echo" <sip:echo@example.com>;tag=')
            assert x.get("sip_To") == "<sip:alice@example.com>"
            assert x.get("sip_Auto-Submitted") == "auto-generated"
            assert_clean(y)

    run(scenario)


def test_echo_never_answers_automatic_or_unauthenticated_messages(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, general={"extensions": ECHO},
                           message={"auth": "optional"}) as y:
            y.register_contact("alice@example.com", ALICE_URI)
            echo = dict(called="echo", sip_uri="sip:echo@example.com",
                        sip_to="<sip:echo@example.com>")
            for over in ({"sip_auto-submitted": "auto-generated"},  # another robot
                         {"username": None},  # nobody vouches for the sender
                         {"xsip_type": "application/im-iscomposing+xml",
                          "sip_content__type": "application/im-iscomposing+xml"}):
                r = await y.message(**echo, **over)
                assert r.get("code") == "200"
            await asyncio.sleep(0.3)
            assert y.xsip_seen == []  # no reply went out: two robots can never loop
            assert_clean(y)

    run(scenario)


def test_echo_leaves_other_domains_to_the_message_feature(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with started(tmp_path, general={"extensions": ECHO}) as y:
            r = await y.message(called="echo", sip_uri="sip:echo@elsewhere.example",
                                sip_to="<sip:echo@elsewhere.example>")
            assert r.get("code") == "403"  # not ours: no open relay, even for the service
            assert_clean(y)

    run(scenario)
