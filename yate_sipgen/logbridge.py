"""Python ``logging`` -> Yate's log (``%%>debug``), with Yate's levels and safe text.

Yate levels (yateclass.h): 1 DebugTest, 2 DebugCrit, 3 DebugConf, 4 DebugStub, 5 DebugWarn,
6 DebugMild, 7 DebugNote, 8 DebugCall, 9 DebugInfo, 10 DebugAll. Yate shows a line when its
level is at most the script's ``debuglevel``; we ask Yate for that level and filter here, so a
quiet Yate does not pay for our debug lines.

Text that came from SIP (display names, bodies) may carry CR, LF or terminal escapes; they are
shown as ``\\xNN`` so nobody can forge a log line or drive the operator's terminal.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable

CONF = 45  # configuration problems: shown at Yate's default level
NOTE = 25
logging.addLevelName(CONF, "CONF")
logging.addLevelName(NOTE, "NOTE")

# Errors and warnings both land on DebugWarn, which Yate shows at its default level (5).
_TO_YATE = [(logging.CRITICAL, 2), (CONF, 3), (logging.WARNING, 5), (NOTE, 7),
            (logging.INFO, 9), (logging.DEBUG, 10)]

_UNSAFE = re.compile("[\x00-\x1f\x7f\x80-\x9f\u2028\u2029\ud800-\udfff]")


def yate_level(levelno: int) -> int:
    for py, y in _TO_YATE:
        if levelno >= py:
            return y
    return 10


def python_level(yate: int) -> int:
    """The lowest Python level whose lines Yate at ``yate`` would show."""
    best = logging.CRITICAL
    for py, y in _TO_YATE:
        if y <= yate:
            best = min(best, py)
    return best


def safe(text: str) -> str:
    """Make untrusted text safe for a log line (no CR/LF/ESC/bidi-free control chars)."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()) & 0xFF:02x}" if ord(m.group()) < 0xD800
                       or ord(m.group()) > 0xDFFF else f"\\x{ord(m.group()) - 0xDC00:02x}", text)


class YateLogHandler(logging.Handler):
    """Writes records through ``sink(level, text)``; stderr when not connected."""

    def __init__(self, sink: Callable[[int, str], bool], max_len: Callable[[], int]) -> None:
        super().__init__()
        self.sink = sink
        self.max_len = max_len
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = safe(self.format(record))
            limit = self.max_len()
            if len(text) > limit:
                text = text[: limit - 20] + " ...[truncated]"
            if not self.sink(yate_level(record.levelno), text):
                sys.stderr.write(f"<sipgen:{record.levelname}> {text}\n")
        except Exception:  # logging must never break the service
            self.handleError(record)


def root_logger() -> logging.Logger:
    return logging.getLogger("yate_sipgen")
