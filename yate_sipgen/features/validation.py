"""Checks an inbound request goes through before any feature acts on it, shared by MESSAGE and
the event packages (SUBSCRIBE, PUBLISH): how a refusal is said, the hops left, the media type,
the body size.

The checks are plain functions with no state, cheap enough for the MESSAGE hot path: each
returns what it found and builds a :class:`Refusal` only for what it refuses.
"""

from __future__ import annotations

from ..events.subscription import SubscribeError
from ..message import Message
from ..protocol import MAX_BUFSIZE, escaped_size, max_line_for

#: A request we refuse: ``Refusal(code, reason, **headers)``; ``reason`` is for the log (SIP
#: answers carry no reason phrase), the headers are answered as ``osip_<name>`` (``_`` in a
#: keyword becomes ``-``: ``Retry_After=`` -> ``Retry-After``). One type for every feature:
#: the events core's ``SubscribeError`` (raised by its Expires and SIP-If-Match rules too).
Refusal = SubscribeError

#: Room on the onward line for everything but the body (headers, params, id).
LINE_OVERHEAD = 3072
ONWARD_ROOM = max_line_for(MAX_BUFSIZE) - LINE_OVERHEAD

#: Hops a request without (or with a malformed) Max-Forwards is taken to have left.
DEFAULT_HOPS = 20


def hops(msg: Message) -> int:
    """Hops left (Yate's ``antiloop``, from Max-Forwards); 20 when absent or not a number."""
    return hops_of(msg.get("antiloop") or "")


def hops_of(antiloop: str) -> int:
    """:func:`hops` of the ``antiloop`` value itself (its wire form is the same: digits)."""
    # (isdecimal, not isdigit: int() takes no superscripts, and "²" must not raise)
    return int(antiloop) if antiloop.lstrip("-").isdecimal() else DEFAULT_HOPS


def unsupported_media(media: str, accept: str) -> Refusal:
    """The 415 for ``media`` (``""``: the request had no type), naming what we take in
    ``Accept``. Test ``media`` against the accepted set where it is found (a set lookup);
    call this only to refuse it."""
    return Refusal(415, f"content type {media}" if media else "no content type", Accept=accept)


def too_big(body: str, extra: dict[str, str], max_body: int, room: int = ONWARD_ROOM) -> str:
    """Why the body cannot be taken (413), or ``""``: over ``max_body`` bytes (with the
    ``extra`` body parts), or too big for the line it must travel on to Yate once escaped."""
    size = len(body) if body.isascii() else len(body.encode("utf-8", "surrogateescape"))
    if extra:
        size += sum(len(v) for v in extra.values())
    if size > max_body:
        return f"body of {size} bytes"
    if 3 * size > room:  # escaping can at most triple it: measure only then
        onward = escaped_size(body) + sum(escaped_size(v) for v in extra.values())
        if onward > room:
            return f"body of {size} bytes ({onward} once escaped)"
    return ""
