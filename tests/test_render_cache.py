"""Each body rendered once per resource state (issue 9 §9), not once per watcher.

The real subscription core (``EventsFeature``: scheduler, reservation, ``_send``) with a stub
engine that answers every NOTIFY 200 and keeps what it was asked to send. N subscriptions watch
one resource; a spy counts how often the package renders. Bodies are compared byte for byte
with the uncached renderers (``bodies.*``), dialog-info versions per subscription.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from yate_sipgen import features
from yate_sipgen.bodies import dialog_info as di
from yate_sipgen.bodies import message_summary as ms
from yate_sipgen.bodies import pidf
from yate_sipgen.config import defaults
from yate_sipgen.events import package as package_mod
from yate_sipgen.events.package import EventPackage
from yate_sipgen.events.store import Publication
from yate_sipgen.events.subscription import Subscription
from yate_sipgen.features.dialog import DialogPackage
from yate_sipgen.features.events import EventsFeature
from yate_sipgen.features.mwi import MessageSummaryPackage
from yate_sipgen.features.presence import PresencePackage
from yate_sipgen.message import Message

N = 25  # more than [events] max_in_flight (20): the fan-out takes several rounds
BOB = "bob@example.com"


class StubEngine:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def spawn(self, coro: Any, what: str = "task") -> "asyncio.Task[Any]":
        return asyncio.ensure_future(coro)

    async def dispatch(self, msg: Message, timeout: float | None = None) -> Message:
        self.sent.append(msg)
        await asyncio.sleep(0)
        return Message(msg.name, {"code": "200"})


def make_core(pkg: EventPackage, **sections: dict[str, Any]) -> EventsFeature:
    cfg = defaults(features.schema())
    cfg["presence"]["min_interval"] = 0.0  # no pacing between the changes of a test
    for name, values in sections.items():
        cfg[name].update(values)
    core = EventsFeature()
    core.engine = StubEngine()
    core.counters = __import__("collections").Counter()
    core.register(pkg)
    core.reconfigure(cfg)
    core.ready = True
    return core


def watch(core: EventsFeature, pkg: EventPackage, n: int = N, resource: str = BOB) -> None:
    for i in range(n):
        core.table.add(Subscription(
            id=f"{pkg.event}-{resource}-{i}", package=pkg.event, event_id="", resource=resource,
            resource_uri=f"sip:{resource}", subscriber=f"w{i}@example.com", call_id=f"c{i}",
            local_tag=f"l{i}", local_uri=f"<sip:{resource}>",
            remote=f"<sip:w{i}@example.com>;tag=r{i}", target=f"sip:w{i}@192.0.2.1:5060",
            content_type=pkg.content_types[0], expires_at=time.time() + 3600))


def watched(pkg: EventPackage, n: int = N) -> tuple[EventsFeature, list[str]]:
    """A core serving ``pkg``, ``n`` subscriptions to bob, and the spy on its renderings."""
    core = make_core(pkg)
    watch(core, pkg, n)
    return core, spy(pkg)


def spy(pkg: EventPackage) -> list[str]:
    """Count the package's renderings (the resource of each)."""
    calls: list[str] = []
    real = pkg.document

    def document(resource: str, variant: Any) -> Any:
        calls.append(resource)
        return real(resource, variant)

    pkg.document = document  # type: ignore[method-assign]
    return calls


async def fan_out(core: EventsFeature, pkg: EventPackage, resource: str = BOB,
                  change: Any = None) -> list[Message]:
    """Change ``resource`` (``change()``, then the package says so) and wait for every NOTIFY."""
    engine: StubEngine = core.engine
    before = len(engine.sent)
    want = len(core.table.watchers(pkg.event, resource))
    if change is not None:
        change()
    pkg.changed(resource)
    deadline = time.monotonic() + 5
    while len(engine.sent) < before + want or core.sched.in_flight:
        assert time.monotonic() < deadline, f"{len(engine.sent) - before} of {want} NOTIFYs"
        await asyncio.sleep(0.001)
    return engine.sent[before:]


def publication(body: str, etag: str) -> Publication:
    return Publication(etag=etag, package="presence", resource=BOB,
                       content_type=pidf.CONTENT_TYPE, body=body,
                       expires_at=time.time() + 3600, published=time.time(), owner="t")


def _doc(basic: str, tid: str = "t1") -> str:
    return (f'<presence xmlns="{pidf.NS}" entity="sip:{BOB}"><tuple id="{tid}"><status>'
            f"<basic>{basic}</basic></status></tuple></presence>")


# -- presence -----------------------------------------------------------------------------

def test_presence_renders_once_per_change_for_every_watcher() -> None:
    async def scenario() -> None:
        pkg = PresencePackage()
        core, calls = watched(pkg)
        sent = await fan_out(core, pkg, change=lambda: pkg.pubs.add(publication(_doc("open"), "e1")))
        assert len(sent) == N and calls == [BOB]
        assert {m["xsip_body"] for m in sent} == {_doc("open")}  # one publication: verbatim
        # a second publication: the composed document, once, the same for all
        sent = await fan_out(core, pkg,
                             change=lambda: pkg.pubs.add(publication(_doc("closed", "t2"), "e2")))
        assert calls == [BOB, BOB]
        bodies = {m["xsip_body"] for m in sent}
        assert bodies == {pidf.compose(f"sip:{BOB}", [_doc("open"), _doc("closed", "t2")])}
        # nothing published any more
        sent = await fan_out(core, pkg, change=lambda: (pkg.pubs.remove("e1"),
                                                        pkg.pubs.remove("e2")))
        assert calls == [BOB] * 3 and {m["xsip_body"] for m in sent} == {pidf.closed(f"sip:{BOB}")}

    asyncio.run(scenario())


# -- dialog -------------------------------------------------------------------------------

def _call(state: str) -> di.Dialog:
    return di.Dialog(id="sip-2", state=state, direction="recipient", call_id="17-1",
                     local_identity=f"sip:{BOB}", remote_identity="sip:345@example.com")


def test_dialog_renders_once_per_change_and_versions_still_count_per_subscription() -> None:
    async def scenario() -> None:
        pkg = DialogPackage()
        core, calls = watched(pkg)
        other = next(iter(core.table.watchers(pkg.event, BOB)))
        other.version = 40  # one subscription further along (refreshed, restarted...)
        seen: dict[str, list[int]] = {}
        for state in ("early", "confirmed", "terminated"):
            def change(state: str = state) -> None:
                pkg.calls[BOB] = {"sip/2": (_call(state), 1, time.time())}

            sent = await fan_out(core, pkg, change=change)
            assert len(sent) == N
            for m in sent:
                version = int(re.search(r'<dialog-info [^>]*?version="(\d+)"',
                                        m["xsip_body"]).group(1))
                # byte for byte what the uncached renderer makes at that version
                assert m["xsip_body"] == di.render(f"sip:{BOB}", version, [_call(state)])
                seen.setdefault(m["sip_Call-ID"], []).append(version)
        assert calls == [BOB] * 3  # three changes, three renderings, 75 NOTIFYs
        assert len(seen) == N
        for call_id, versions in seen.items():
            assert versions == sorted(set(versions)) and len(versions) == 3, call_id
        assert seen[other.call_id][0] == 40

    asyncio.run(scenario())


def test_dialog_knobs_are_part_of_the_rendering_and_a_reload_renders_anew() -> None:
    async def scenario() -> None:
        pkg = DialogPackage()
        core, calls = watched(pkg, n=3)
        sent = await fan_out(core, pkg, change=lambda: pkg.calls.__setitem__(
            BOB, {"sip/2": (_call("confirmed"), 1, time.time())}))
        assert all("<remote>" in m["xsip_body"] for m in sent)
        cfg = defaults(features.schema())
        cfg["dialog"]["remote_identity"] = False
        core.reconfigure(cfg)  # same state, other knobs: not from the cache
        assert "<remote>" not in pkg.body(next(iter(core.table.watchers("dialog", BOB))), 9)
        assert calls == [BOB, BOB]

    asyncio.run(scenario())


# -- message-summary ------------------------------------------------------------------------

def test_message_summary_renders_once_per_change() -> None:
    async def scenario() -> None:
        pkg = MessageSummaryPackage()
        core, calls = watched(pkg)
        sent = await fan_out(core, pkg, change=lambda: pkg.counts.__setitem__(
            BOB, ms.Counts(3, 1)))
        assert calls == [BOB]
        assert {m["xsip_body"] for m in sent} == {ms.render(f"sip:{BOB}", ms.Counts(3, 1))}
        # the stored instant messages change without a NOTIFY of their own: a new count
        # found before a NOTIFY is a new document
        core._texts[BOB] = 0

        async def counted(resource: str) -> None:
            core._texts[resource] = 2

        core.count_texts = counted  # type: ignore[method-assign]
        sent = await fan_out(core, pkg)
        body = ms.render(f"sip:{BOB}", ms.Counts(3, 1, text_new=2))
        assert {m["xsip_body"] for m in sent} == {body}
        assert calls == [BOB, BOB]

    asyncio.run(scenario())


# -- invalidation and the bound ---------------------------------------------------------------

class Counting(EventPackage):
    event = "x-test"
    content_types = ("text/plain",)
    section = "presence"

    def __init__(self) -> None:
        super().__init__()
        self.state: dict[str, int] = {}

    def document(self, resource: str, variant: Any) -> str:
        return f"{resource}={self.state.get(resource, 0)} variant={variant}"

    def variant(self, sub: Subscription) -> Any:
        return sub.subscriber.startswith("w1")  # a per-subscription knob


def test_a_change_through_the_core_invalidates_only_that_resource() -> None:
    async def scenario() -> None:
        pkg = Counting()
        core = make_core(pkg)
        watch(core, pkg, n=12)
        watch(core, pkg, n=2, resource="carol@example.com")
        calls = spy(pkg)
        bob = core.table.watchers(pkg.event, BOB)
        carol = core.table.watchers(pkg.event, "carol@example.com")
        assert {pkg.body(s, 0) for s in bob} == {f"{BOB}=0 variant=False",
                                                  f"{BOB}=0 variant=True"}
        assert {pkg.body(s, 0) for s in carol}
        assert len(calls) == 4  # two variants each (w0..., w1...)
        pkg.state[BOB] = 1
        core.changed(pkg.event, BOB)  # the core's own entry point invalidates too
        assert {pkg.body(s, 0) for s in bob} == {f"{BOB}=1 variant=False",
                                                  f"{BOB}=1 variant=True"}
        assert {pkg.body(s, 0) for s in carol}
        assert len(calls) == 6  # carol's came from the cache
        await asyncio.sleep(0.05)  # let the NOTIFYs the change queued go

    asyncio.run(scenario())


def test_the_cache_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(package_mod, "MAX_RENDERED", 3)
    pkg = Counting()
    for i in range(5):
        pkg.rendered(f"u{i}@example.com")
    assert list(pkg._rendered) == ["u2@example.com", "u3@example.com", "u4@example.com"]
    calls = spy(pkg)
    pkg.rendered("u0@example.com")  # dropped earlier: rendered again
    pkg.rendered("u4@example.com")
    assert calls == ["u0@example.com"]
