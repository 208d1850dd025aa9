"""Hypothesis drives the subscription and publication state machines of the real script
(through the fake Yate) with every input in every state, against a plain model:

* subscriptions: initial, refresh, unsubscribe, a too short Expires, for dialogs that exist,
  ended or never existed -> 200 / 481 / 423 as the model says, and ``sipgen subscriptions``
  lists exactly the live ones;
* publications: initial, refresh, modify, remove with a live, an outdated or a made-up ETag,
  and an initial without a body -> 200 / 412 / 400, and ``sipgen publications`` lists exactly
  the live ones.

Derandomized: the same examples every run.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events_e2e_harness import started
from msg_e2e_harness import assert_clean, run

SUB_OPS = st.tuples(st.sampled_from(["sub", "refresh", "unsub", "short"]), st.integers(0, 3))
PUB_OPS = st.tuples(st.sampled_from(["initial", "refresh", "modify", "remove", "empty"]),
                    st.integers(0, 3))
OPS = st.lists(st.one_of(SUB_OPS.map(lambda t: ("s",) + t), PUB_OPS.map(lambda t: ("p",) + t)),
               min_size=1, max_size=14)


def _count(listing: str, header: str) -> int:
    lines = [ln for ln in listing.strip().split("\r\n") if ln]
    return 0 if lines[0].startswith("No ") else len(lines) - 1


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=OPS)
def test_every_input_in_every_state_matches_the_model(tmp_path_factory, ops) -> None:
    tmp_path: Path = tmp_path_factory.mktemp("model")

    async def scenario() -> None:
        async with started(tmp_path, {"presence": {"min_interval": "0"}}) as y:
            dialogs: dict[int, tuple[str, str]] = {}  # slot -> (call-id, our tag)
            live: set[str] = set()  # Call-IDs of live subscriptions
            etags: dict[int, str] = {}  # slot -> ETag, live ones
            old: dict[int, str] = {}  # slot -> an ETag no longer valid
            n = 0
            for kind, op, slot in ops:
                n += 1
                if kind == "s":
                    if op in ("sub", "short") and (op == "sub" or slot % 2):
                        cid, tag = f"m{n}@x", str(10_000 + n)
                        r = await y.subscribe(sip_callid=cid, xsip_dlgtag=tag,
                                              sip_expires="1" if op == "short" else "600")
                        if op == "short":
                            assert r.get("code") == "423", (ops, n)
                            continue
                        assert r.get("code") == "200", (ops, n)
                        dialogs[slot] = (cid, tag)
                        live.add(cid)
                        continue
                    cid, tag = dialogs.get(slot, (f"never{slot}@x", "999"))
                    expires = {"refresh": "300", "unsub": "0", "short": "1"}[op]
                    r = await y.subscribe(sip_callid=cid, xsip_dlgtag=tag, sip_expires=expires,
                                          sip_to=f"<sip:bob@example.com>;tag={tag}")
                    want = "423" if op == "short" else "200" if cid in live else "481"
                    assert r.get("code") == want, (ops, n)
                    if op == "unsub":
                        live.discard(cid)
                else:
                    if op == "empty":
                        r = await y.publish(xsip_body=None, xsip_type=None,
                                            sip_content__type=None)
                        assert r.get("code") == "400", (ops, n)
                        continue
                    if op == "initial":
                        r = await y.publish()
                        assert r.get("code") == "200", (ops, n)
                        if slot in etags:
                            old[slot] = etags[slot]
                        etags[slot] = r.get("osip_SIP-ETag")
                        continue
                    etag = etags.get(slot) or old.get(slot) or f"made-up-{slot}"
                    body = {"refresh": None, "modify": "keep", "remove": None}[op]
                    over = {"sip_sip__if__match": etag}
                    if body is None:
                        over.update(xsip_body=None, xsip_type=None, sip_content__type=None)
                    if op == "remove":
                        over["sip_expires"] = "0"
                    r = await y.publish(**over)
                    valid = etags.get(slot) == etag
                    assert r.get("code") == ("200" if valid else "412"), (ops, n)
                    if valid:
                        old[slot] = etag
                        if op == "remove":
                            del etags[slot]
                        else:
                            etags[slot] = r.get("osip_SIP-ETag")
                            assert etags[slot] != etag
            subs = await y.command("sipgen subscriptions")
            assert _count(subs, "resource") == len(live), (ops, subs)
            pubs = await y.command("sipgen publications")
            assert _count(pubs, "resource") == len(etags), (ops, pubs)
            assert_clean(y)

    run(scenario, timeout=30)
