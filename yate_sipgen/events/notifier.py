"""Which NOTIFY goes next, what it looks like, and what its outcome means. No I/O of its
own (:func:`dispatch_notify` and :meth:`NotifyScheduler.run_job` await what they are given).

Each NOTIFY is an ``xsip.generate`` with ``wait=true``, which holds one Yate engine worker until
its SIP transaction ends (about 7.5 s for a dead UDP contact; Yate has 10 workers by default).
So:

* at most ``max_in_flight`` NOTIFYs wait on Yate at once (all packages together);
* one subscription never has two NOTIFYs in flight (CSeq order; Kamailio documents CSeq reuse
  when it allowed that);
* a subscription marked again while queued or in flight is sent once more, with the state of
  the moment it is sent: bursts coalesce to the latest state;
* urgent NOTIFYs (the first after a SUBSCRIBE or refresh, the final ``terminated``) go before
  state changes and are never paced;
* state changes of a subscription are paced to one per ``interval`` seconds of its package
  (RFC 3856 §6.6: presence at most once per 5 s);
* a NOTIFY that belongs to no subscription (unsolicited message-summary, RFC 3842) is a *job*
  queued under an id of its own (:meth:`NotifyScheduler.mark_job`): the same cap, pacing and
  coalescing apply, and the core runs the job instead of a subscription's NOTIFY.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import DispatchCancelled, DispatchTimeout, LocalProtocolError
from ..message import Message
from .subscription import TERMINATED, Subscription

#: NOTIFY answers after which the subscription is gone (RFC 6665 §4.2.2, RFC 5057 §5.1-5.2):
#: the dialog or the subscriber no longer exists or never will accept it.
REMOVE_CODES = frozenset((404, 405, 410, 416, 480, 481, 482, 483, 484, 485, 489, 501, 604))
#: The transaction timed out (Yate reports 408): the subscriber is unreachable.
TIMEOUT_CODE = 408
#: Yate could not even send it (a TCP connection gone, no transport): retried a few times.
TRANSPORT_ERRORS = frozenset(("notransport", "noconn"))
#: Retries after a transport error, and the delay before each (seconds).
TRANSPORT_RETRIES = (2.0, 10.0, 30.0)

OK, REMOVE, KEEP, RETRY = "ok", "remove", "keep", "retry"

log = logging.getLogger("yate_sipgen.events")


def outcome(code: int, error: str, transport_failures: int) -> str:
    """What a NOTIFY's result means: ``ok``; ``remove`` the subscription; ``keep`` it (401,
    407, 491, 500, 503 and any other failure that is about this transaction only: the next
    state change tries again); ``retry`` (a transport error, up to :data:`TRANSPORT_RETRIES`)."""
    if 200 <= code < 300:
        return OK
    if code in REMOVE_CODES or code == TIMEOUT_CODE:
        return REMOVE
    if not code and error in TRANSPORT_ERRORS:
        return RETRY if transport_failures < len(TRANSPORT_RETRIES) else REMOVE
    return KEEP


class NotifyScheduler:
    """Queues of subscription ids to NOTIFY; see the module docstring for the rules."""

    def __init__(self, max_in_flight: int = 20) -> None:
        self.max_in_flight = max_in_flight
        self._urgent: deque[str] = deque()
        self._normal: deque[str] = deque()
        self._queued: dict[str, bool] = {}  # id -> urgent
        self._paced: list[tuple[float, str]] = []  # (due, id)
        self._due: dict[str, float] = {}
        self.in_flight: set[str] = set()
        self._again: dict[str, bool] = {}  # marked while in flight -> urgent
        self._last: dict[str, float] = {}
        #: id -> (what sends it, its pacing interval), for NOTIFYs of no subscription
        self.jobs: dict[str, tuple[Callable[[], Awaitable[None]], float]] = {}

    def __len__(self) -> int:
        return len(self._queued) + len(self._due) + len(self._again)

    def mark(self, sid: str, now: float, *, urgent: bool = False, interval: float = 0.0) -> None:
        """The subscription needs a NOTIFY (its state changed, or it is new/refreshed/ending)."""
        if sid in self.in_flight:
            self._again[sid] = self._again.get(sid, False) or urgent
            return
        if sid in self._queued:
            if urgent and not self._queued[sid]:
                self._queued[sid] = True
                self._urgent.append(sid)  # its entry in _normal is skipped later
            return
        if not urgent and interval > 0:
            due = self._last.get(sid, 0.0) + interval
            if due > now:
                if sid not in self._due:
                    self._due[sid] = due
                    heapq.heappush(self._paced, (due, sid))
                return
        self._due.pop(sid, None)
        self._queued[sid] = urgent
        (self._urgent if urgent else self._normal).append(sid)

    def take(self, now: float) -> list[str]:
        """Ids to send now, as many as the cap allows, urgent first."""
        paced = self._paced
        while paced and paced[0][0] <= now:
            due, sid = heapq.heappop(paced)
            if self._due.get(sid) == due:
                del self._due[sid]
                if sid in self.in_flight:
                    self._again.setdefault(sid, False)
                elif sid not in self._queued:
                    self._queued[sid] = False
                    self._normal.append(sid)
        out: list[str] = []
        room = self.max_in_flight - len(self.in_flight)
        for q in (self._urgent, self._normal):
            while q and room > 0:
                sid = q.popleft()
                urgent = self._queued.get(sid)
                if urgent is None or (q is self._normal and urgent):
                    continue  # sent already, or moved to the urgent queue
                del self._queued[sid]
                self.in_flight.add(sid)
                out.append(sid)
                room -= 1
        return out

    def done(self, sid: str, now: float, interval: float = 0.0) -> None:
        """Its NOTIFY is over; a mark that came meanwhile is queued now."""
        self.in_flight.discard(sid)
        self._last[sid] = now
        again = self._again.pop(sid, None)
        if again is not None:
            self.mark(sid, now, urgent=again, interval=interval)
        elif sid in self.jobs and sid not in self._queued and sid not in self._due:
            del self.jobs[sid]  # nothing more to send under this id: keep nothing for it
            del self._last[sid]

    def mark_job(self, sid: str, job: Callable[[], Awaitable[None]], now: float,
                 interval: float = 0.0) -> None:
        """Queue a NOTIFY that belongs to no subscription: ``job()`` sends it when its turn
        comes (cap and pacing as for a subscription's). Marked again before it went, it goes
        once, with the newest ``job``; marked while in flight, once more afterwards."""
        self.jobs[sid] = (job, interval)
        self.mark(sid, now, interval=interval)

    async def run_job(self, sid: str) -> None:
        """Run the job of ``sid`` (an id :meth:`take` gave out), then :meth:`done`. A job
        reports its own failures; one that raises is logged, never retried."""
        job, interval = self.jobs[sid]
        try:
            await job()
        except Exception:  # noqa: BLE001 - one job must not stop the queue
            log.exception("NOTIFY job %s failed", sid)
        finally:
            self.done(sid, time.time(), interval)

    def retry_at(self, sid: str, when: float) -> None:
        """Send again at ``when`` (after a transport error)."""
        self.in_flight.discard(sid)
        self._again.pop(sid, None)
        if self._due.get(sid, when + 1) > when:
            self._due[sid] = when
            heapq.heappush(self._paced, (when, sid))

    def forget(self, sid: str) -> None:
        """The subscription is gone: drop whatever was queued for it (not its final NOTIFY,
        which the caller queues under its own id)."""
        self._queued.pop(sid, None)
        self._due.pop(sid, None)
        self._again.pop(sid, None)
        self._last.pop(sid, None)

    def next_wakeup(self) -> float | None:
        """When a paced NOTIFY becomes due (None: nothing paced)."""
        paced = self._paced
        while paced and self._due.get(paced[0][1]) != paced[0][0]:
            heapq.heappop(paced)
        return paced[0][0] if paced else None

    @property
    def has_ready(self) -> bool:
        return bool(self._queued) and len(self.in_flight) < self.max_in_flight


def notify_params(sub: Subscription, now: float, cseq: int, content_type: str, body: str,
                  contact: str, trans_count: int = -1) -> dict[str, str]:
    """The ``xsip.generate`` params of one NOTIFY on ``sub``'s dialog (RFC 6665 §4.2.1.4,
    RFC 3261 §12.2.1.1): From = the SUBSCRIBE's To with our tag, To = the subscriber's From,
    same Call-ID, our CSeq, Request-URI = the subscriber's Contact, the Route set, the next hop
    given explicitly. Every value here was checked when the subscription was made."""
    p: dict[str, Any] = {
        "method": "NOTIFY", "uri": sub.target, "wait": "true",
        "sip_From": f"{sub.local_uri};tag={sub.local_tag}",
        "sip_To": sub.remote,
        "sip_Call-ID": sub.call_id,
        "sip_CSeq": f"{cseq} NOTIFY",
        "sip_Event": sub.event_header(),
        "sip_Subscription-State": sub.state_header(now),
    }
    if contact:
        p["sip_Contact"] = contact
    if sub.route:
        p["sip_Route"] = sub.route
    if sub.host:
        p["host"] = sub.host
        if sub.port:
            p["port"] = sub.port
    if sub.connection_id:
        p["connection_id"] = sub.connection_id
    if trans_count >= 0:
        p["xsip_trans_count"] = str(trans_count)
    if body or sub.state != TERMINATED:
        p["xsip_type"] = content_type
        p["xsip_body"] = body
    return p


async def dispatch_notify(engine: Any, params: dict[str, str], timeout: float
                          ) -> tuple[int, str]:
    """Send one NOTIFY (``xsip.generate`` with ``params``) through ``engine``; Yate's
    ``(code, error)``, as :func:`outcome` takes them: a timeout waiting for Yate is 408, the
    connection to Yate gone ``noconn``, a message we could not even write 500 (logged)."""
    try:
        answer = await engine.dispatch(Message("xsip.generate", params), timeout=timeout)
    except DispatchTimeout:
        return 408, ""
    except DispatchCancelled:
        return 0, "noconn"
    except LocalProtocolError as e:
        log.warning("cannot send NOTIFY to %s: %s", params.get("uri", "?"), e)
        return 500, ""
    c = answer.get("code") or ""
    return (int(c) if c.isdigit() else 0), answer.get("error") or ""


def unsolicited_params(*, event: str, uri: str, to_uri: str, from_uri: str, from_tag: str,
                       call_id: str, content_type: str, body: str, host: str = "",
                       port: str = "", connection_id: str = "", contact: str = "",
                       trans_count: int = -1) -> dict[str, str]:
    """The ``xsip.generate`` params of a NOTIFY outside any dialog (unsolicited
    message-summary, RFC 3842): a new Call-ID, From our identity with a fresh tag, To the
    user's AOR, Request-URI the registered contact, the next hop given explicitly.
    ``Subscription-State: terminated``: RFC 6665 §8.2.3 wants the header in every NOTIFY, and
    no subscription exists (what Asterisk's res_pjsip_mwi sends too). Every value must have
    been checked by the caller (``header_safe``)."""
    p = {
        "method": "NOTIFY", "uri": uri, "wait": "true",
        "sip_From": f"<{from_uri}>;tag={from_tag}",
        "sip_To": f"<{to_uri}>",
        "sip_Call-ID": call_id,
        "sip_CSeq": "1 NOTIFY",
        "sip_Event": event,
        "sip_Subscription-State": "terminated",
    }
    if contact:
        p["sip_Contact"] = contact
    if host:
        p["host"] = host
        if port:
            p["port"] = port
    if connection_id:
        p["connection_id"] = connection_id
    if trans_count >= 0:
        p["xsip_trans_count"] = str(trans_count)
    p["xsip_type"] = content_type
    p["xsip_body"] = body
    return p
