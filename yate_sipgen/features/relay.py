"""The relay of one MESSAGE as callbacks: the hot path, without a coroutine to step.

A relayed MESSAGE is ``call.route`` out and back, ``xsip.generate`` out and back, the answer
out. :class:`RelayJob` does exactly that, from Yate's answers as they are read (an engine
:class:`~yate_sipgen.engine.Job`), as long as nothing makes it wait. Wherever something does
(the recipient's lock is held or it has a stored backlog, the delivery slots are full, a fork,
a non-``sip/`` target, a failure to store, the answer deadline's store), it hands over to the
MESSAGE feature's coroutine at the same point, so there is one definition of what happens
then (:meth:`MessageFeature._after_lookup`, :meth:`MessageFeature._conclude`), and the
behaviour is the same either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..engine import Job
from ..errors import DispatchCancelled, LocalProtocolError
from ..message import Message
from .delivery import Route, route_of

if TYPE_CHECKING:
    from .message import Inbound, MessageFeature, _LiveState


class RelayJob(Job):
    """Route, send and answer one MESSAGE (see the module's docstring).

    ``route`` given (msg.execute: Yate routed it already): no call.route. The live delivery
    (counted, watched against the answer deadline) begins in :meth:`run`; it ends here on the
    callback path, or in the coroutine it is handed to.
    """

    __slots__ = ("f", "inb", "route", "state", "started", "had_backlog", "gate", "locked",
                 "sending")

    def __init__(self, feature: "MessageFeature", msg: Message, inb: "Inbound",
                 route: Route | None) -> None:
        Job.__init__(self, feature.engine, msg)
        self.f = feature
        self.inb = inb
        self.route = route
        self.state: "_LiveState | None" = None
        self.started = 0.0
        self.had_backlog = False
        self.gate: Any = None  # waiting for the recipient's lock
        self.locked = False  # holding the recipient's lock
        self.sending = False  # holding a delivery slot

    def run(self) -> None:
        f = self.f
        msg = self.msg
        self.state = f._live_begin(msg, self.inb)
        route = self.route or f._known_route(self.inb)
        if route is not None:
            self._routed(route)
            return
        try:
            self.wait_wire("call.route", f._route_wire(self.inb, msg), self._on_route,
                           f._route_budget(msg))
        except DispatchCancelled as e:  # not connected
            self._routed(route_of(None, e))

    def _on_route(self, answer: Message | None, exc: BaseException | None) -> None:
        self._routed(route_of(answer, exc))

    def _routed(self, route: Route) -> None:
        """What MessageFeature._deliver_live does, up to holding the recipient's lock."""
        f = self.f
        self.route = route
        inb = self.inb
        out = inb.out
        state: Any = self.state
        d = f.deliverer
        if not f._sends_itself(route, state) or f._must_spill(self.msg, out, inb.parties.media):
            self._hand_over(f._after_lookup(self.msg, inb, route, state))
            return
        self.had_backlog = out.user in d.backlog  # stored before we came
        waiter = d.users.enter(out.user)
        if waiter is None:
            self._locked()
        else:  # behind another delivery to this user (RFC 3428 §8): in FIFO order
            self.gate = waiter
            self.wait_for(waiter, self._on_lock)

    def _on_lock(self, _none: None, exc: BaseException | None) -> None:
        self.gate = None
        self.locked = True
        if exc is not None:
            raise exc
        self._locked()

    def _locked(self) -> None:
        """Holding the lock: MessageFeature._deliver_locked, sent here when it is one send."""
        f = self.f
        self.locked = True
        out = self.inb.out
        state: Any = self.state
        d = f.deliverer
        if (f._backlog_first(out.user, state, self.had_backlog)
                or not d.slots.try_enter()):  # a delivery slot, taken at once when free
            self.locked = False  # the coroutine holds it now, and gives it up
            self._hand_over(f._after_lock(self.msg, self.inb, self.route, state,
                                          self.had_backlog))
            return
        self.sending = True
        target = self.route.targets[0]  # type: ignore[union-attr]
        self.started = self.engine.now()
        try:
            self.wait_wire("xsip.generate", d.xsip_wire(out, target), self._on_sent,
                           d.delivery_timeout)
        except LocalProtocolError as e:  # too big for Yate's line, ...
            self._sent(d.cannot_send(out, target, e))
        except DispatchCancelled:
            self._sent(0)

    def _on_sent(self, answer: Message | None, exc: BaseException | None) -> None:
        self._sent(self.f.deliverer.sip_outcome(self.started, answer, exc))

    def _sent(self, code: int) -> None:
        f = self.f
        self.sending = False
        f.deliverer.slots.leave()
        route: Any = self.route
        self.locked = False
        f._leave_user(self.inb.out.user, route.targets, 200 <= code < 300)
        state: Any = self.state
        self.state = None
        f._live_end(state)
        if state.storing is None and 200 <= code < 300:
            f._delivered(self.msg, code)
            self.finish()
            return
        self.hand_over(f._conclude(self.msg, self.inb, state, code, route))

    def _hand_over(self, coro: Any) -> None:
        self.state = None  # the coroutine ends the live delivery
        self.hand_over(coro)

    def release(self) -> None:
        f = self.f
        users = f.deliverer.users
        user = self.inb.out.user
        gate, self.gate = self.gate, None
        if gate is not None:
            if gate.done() and not gate.cancelled():
                users.leave(user)  # the lock was just handed to us: pass it on
            else:
                gate.cancel()
        if self.sending:
            self.sending = False
            f.deliverer.slots.leave()
        if self.locked:
            self.locked = False
            users.leave(user)
        state = self.state
        if state is not None:
            self.state = None
            f._live_end(state)
