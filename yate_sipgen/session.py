"""Sans-I/O bookkeeping for one connection to Yate.

:class:`Session` takes bytes and the current time and returns typed events; everything it wants
to write accumulates until :meth:`Session.data_to_send` (one write per batch, as h2 does). It
owns the two promises the rest of the program relies on:

* every ``%%>message`` Yate hands us is answered **exactly once** (:meth:`answer` refuses a
  second answer; :meth:`overdue` lists what must be answered now because Yate's timeout is
  near), and an answer is never lost for being too long (a minimal fallback is written instead);
* every line written fits Yate's buffer (the :class:`~yate_sipgen.protocol.Encoder` checks it,
  and follows the ``bufsize`` Yate confirmed).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from . import protocol as p
from .errors import LineTooLong, LocalProtocolError, RemoteProtocolError
from .message import Message

#: Retry-After (seconds) suggested to SIP peers when we shed load.
RETRY_AFTER = "5"

_ANSWER = p.AnswerReceived
_MESSAGE = p.MessageReceived


@dataclass(frozen=True, slots=True)
class BadLineReceived:
    """A line from Yate that Yate's own rules say is malformed; it was dropped."""

    line: bytes
    error: RemoteProtocolError


def is_sip(name: str) -> bool:
    """``sip.*`` messages: Yate turns "not handled" into 405, so failures answer handled + code."""
    return name.startswith("sip.")


class Session:
    """The protocol state of one Yate connection (pipe or socket), without any I/O.

    Args:
        answer_within: seconds from reading a ``%%>message`` to its deadline; choose it below
            Yate's ``timeout`` for this script so our answer always arrives first.
    """

    def __init__(self, *, answer_within: float = 9.0) -> None:
        self.encoder = p.Encoder()
        self.answer_within = answer_within
        self.incoming: dict[str, Message] = {}  # waiting for our answer, oldest first
        self.outgoing: set[str] = set()  # ids of our dispatches waiting for Yate's answer
        self.bufsize = p.DEFAULT_BUFSIZE
        self._out: list[bytes] = []
        self._partial: list[bytes] = []
        self._prefix = f"sg{os.getpid()}{secrets.token_hex(3)}."  # (plain: needs no escape)
        self._seq = 0
        self.closed = False

    # -- input -------------------------------------------------------------------------------
    def receive_data(self, data: bytes, now: float) -> list[object]:
        """Feed bytes read from Yate; returns the decoded events in order.

        Lines have no length limit. Malformed lines become :class:`BadLineReceived` events.
        ``b""`` is not EOF here: call :meth:`receive_eof`.
        """
        if self._partial:
            if b"\n" not in data:
                self._partial.append(data)
                return []
            self._partial.append(data)
            data = b"".join(self._partial)
            self._partial = []
        lines = data.split(b"\n")
        rest = lines.pop()
        if rest:
            self._partial.append(rest)
        events: list[object] = []
        parse = p.parse_yate_line
        append = events.append
        answered = self.outgoing.discard
        deadline = now + self.answer_within
        for raw in lines:
            try:
                ev = parse(raw)
            except RemoteProtocolError as e:
                append(BadLineReceived(raw, e))
                continue
            except (ValueError, OverflowError) as e:  # never let one line stop the reader
                append(BadLineReceived(raw, RemoteProtocolError(f"unparsable: {e}")))
                continue
            if ev is None:
                continue
            append(ev)
            t = type(ev)
            if t is _ANSWER:
                answered(ev.id)
            elif t is _MESSAGE:
                msg = ev.message
                msg.received_at = now
                msg.deadline = deadline
                self.incoming[msg.id] = msg
            elif t is p.SetLocalReplied and ev.name == "bufsize" and ev.success:
                try:
                    self.set_bufsize(int(ev.value))
                except ValueError:
                    pass
        return events

    def receive_eof(self) -> None:
        self.closed = True

    def set_bufsize(self, bufsize: int) -> None:
        self.bufsize = min(max(bufsize, p.MIN_BUFSIZE), p.MAX_BUFSIZE)
        self.encoder.max_line = p.max_line_for(self.bufsize)

    # -- output ------------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out = []
        return data

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    def new_id(self) -> str:
        self._seq += 1
        return self._prefix + str(self._seq)

    def dispatch(self, msg: Message, *, expect_answer: bool = True) -> str:
        """Queue ``msg`` for Yate; returns its id (empty when no answer is wanted).

        With ``expect_answer=False`` the id is empty: Yate sends no answer, and (reference
        §1.4.3, Surprise 10) the message *is* delivered to our own handlers and watchers.
        """
        if expect_answer:
            self._seq += 1  # new_id(), inline
            mid = self._prefix + str(self._seq)
            self._out.append(self.encoder.message(msg, mid))
            self.outgoing.add(mid)
            return mid
        self._out.append(self.encoder.message(msg, ""))
        return ""

    def dispatch_wire(self, name: str, wire: str) -> str:
        """:meth:`dispatch` of the message ``name`` whose params are given already escaped
        (``:k=v...``; see :meth:`Encoder.message_wire`), without a Message; returns its id."""
        self._seq += 1
        mid = self._prefix + str(self._seq)
        self._out.append(self.encoder.message_wire(name, wire, mid, plain_id=True))
        self.outgoing.add(mid)
        return mid

    def forget(self, mid: str) -> None:
        """Stop waiting for ``mid`` (our dispatch timed out); a late answer is then ignored."""
        self.outgoing.discard(mid)

    def answer(self, msg: Message, handled: bool) -> LineTooLong | None:
        """Answer a message Yate handed us, with only what the handler changed.

        Raises :class:`LocalProtocolError` if it is not waiting for an answer (already answered,
        or not ours). If the answer would be too long for Yate's buffer, the minimal fallback
        answer (:meth:`answer_failure`) is written instead and the error is returned.
        """
        mid = msg.id
        if mid not in self.incoming:
            raise LocalProtocolError(f"message {msg.name} id {mid!r} is not waiting for an answer")
        name = msg.name if msg.name != msg.original_name else ""
        try:
            line = self.encoder.answer(mid, handled, name, msg.retval, msg.changes)
        except LocalProtocolError as e:  # too long, or a change Yate cannot take
            self.answer_failure(msg, 500)
            return e if isinstance(e, LineTooLong) else LineTooLong(0, 0, f"answer ({e.reason})")
        del self.incoming[mid]
        msg.answered = True
        msg.handled = handled
        self._out.append(line)
        return None

    def answer_failure(self, msg: Message, code: int = 500, retry_after: str | None = None) -> None:
        """Answer with "what fits a failure": the handler's changes are dropped.

        ``sip.*``: handled ``true`` with ``code`` (an unhandled one would become 405, §2.3) and
        ``osip_Retry-After`` when given. Others: ``false``, the message unchanged.
        """
        if self.incoming.pop(msg.id, None) is None:
            raise LocalProtocolError(f"message {msg.name} id {msg.id!r} is not waiting for an answer")
        msg.answered = True
        msg.handled = is_sip(msg.original_name)
        try:
            self._out.append(self._failure_line(msg, code, retry_after))
        except LineTooLong:
            # the original retval itself is too long to echo: for sip.* the code decides and
            # the retval may be cleared; otherwise "%%<message:<id>:false:" changes nothing
            if msg.handled:
                self._out.append(self.encoder.answer(msg.id, True, "", "", {"code": str(code)}))
            else:
                self._out.append(f"%%<message:{msg.id}:false:\n".encode(p.ENCODING, p.ERRORS))

    def _failure_line(self, msg: Message, code: int, retry_after: str | None = None) -> bytes:
        if is_sip(msg.original_name):
            changes: dict[str, str | None] = {"code": str(code)}
            if retry_after:
                changes["osip_Retry-After"] = retry_after
            return self.encoder.answer(msg.id, True, "", msg.original_retval, changes)
        return self.encoder.answer(msg.id, False, "", msg.original_retval, None)

    def overdue(self, now: float) -> Iterator[Message]:
        """Messages whose deadline has come, in arrival order.

        Every pending message is looked at: deadlines are not monotonic in arrival order once
        a reload has shortened ``answer_within``. (This runs only when the deadline timer
        fires, not per message.)
        """
        for msg in [m for m in self.incoming.values() if m.deadline <= now]:
            yield msg

    def next_deadline(self) -> float | None:
        """The earliest deadline of a message still waiting for our answer."""
        if not self.incoming:
            return None
        return min(m.deadline for m in self.incoming.values())

    # -- keywords ----------------------------------------------------------------------------
    def install(self, name: str, priority: int = 100, filter_name: str | None = None,
                filter_value: str | None = None) -> None:
        self._out.append(self.encoder.install(name, priority, filter_name, filter_value))

    def uninstall(self, name: str) -> None:
        self._out.append(self.encoder.uninstall(name))

    def watch(self, name: str) -> None:
        self._out.append(self.encoder.watch(name))

    def unwatch(self, name: str) -> None:
        self._out.append(self.encoder.unwatch(name))

    def setlocal(self, name: str, value: str | bool | int) -> None:
        self._out.append(self.encoder.setlocal(name, value))
        if name == "bufsize" and str(value).strip().isdigit():
            # Yate applies a smaller buffer as soon as it reads this line: so must we
            new = min(max(int(value), p.MIN_BUFSIZE), p.MAX_BUFSIZE)
            if new < self.bufsize:
                self.set_bufsize(new)

    def output(self, text: str) -> None:
        self._out.append(self.encoder.output(text))

    def debug(self, level: int, text: str) -> None:
        self._out.append(self.encoder.debug(level, text))

    def connect(self, role: str = "global") -> None:
        self._out.append(self.encoder.connect(role))

    def quit(self) -> None:
        self._out.append(self.encoder.quit())
