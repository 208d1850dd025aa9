"""Error types, split the way h11 splits them.

* :class:`RemoteProtocolError`: Yate (or whatever is on the other end of the pipe) sent a line
  that Yate's own decoder rules say is malformed.  The line is reported and dropped; nothing
  else happens.
* :class:`LocalProtocolError`: our code asked for something that cannot be written as a line
  Yate would accept (an empty param name, a ``:`` in a raw field, a line over Yate's buffer).
  Raised at the API, before anything reaches the output buffer.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of both protocol error kinds; never raised directly."""

    def __init__(self, reason: str, line: bytes | str | None = None) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise RemoteProtocolError or LocalProtocolError instead")
        super().__init__(reason)
        self.reason = reason
        self.line = line


class RemoteProtocolError(ProtocolError):
    """The peer (Yate) sent a line that does not follow the extmodule protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to send something Yate would refuse or misread."""


class LineTooLong(LocalProtocolError):
    """The encoded line would not fit in Yate's input buffer (``bufsize - 2`` bytes).

    Yate does not reject such a line: it closes the pipe and kills the script (reference
    §1.2), so the size is checked before the line reaches the output buffer.
    """

    def __init__(self, size: int, limit: int, what: str = "line") -> None:
        super().__init__(f"{what} of {size} bytes exceeds Yate's limit of {limit} bytes")
        self.size = size
        self.limit = limit


class DispatchTimeout(Exception):
    """A message we dispatched to Yate got no answer within its timeout."""


class DispatchCancelled(Exception):
    """The connection to Yate went away while a dispatched message was pending."""


class ConfigError(Exception):
    """A configuration file is invalid; the text says file, section, key and what is allowed."""
