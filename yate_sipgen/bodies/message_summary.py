"""simple-message-summary bodies (RFC 3842): the message-waiting indicator."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .xml import BodyError

CONTENT_TYPE = "application/simple-message-summary"
_CTL = re.compile(r"[\x00-\x1f\x7f]")
_COUNTS = re.compile(r"\s*(\d{1,9})\s*/\s*(\d{1,9})\s*(?:\(\s*(\d{1,9})\s*/\s*(\d{1,9})\s*\))?\s*$")


@dataclass(frozen=True, slots=True)
class Counts:
    voice_new: int = 0
    voice_old: int = 0
    voice_urgent_new: int = 0
    voice_urgent_old: int = 0
    text_new: int = 0
    text_old: int = 0

    def __post_init__(self) -> None:
        for name in ("voice_new", "voice_old", "voice_urgent_new", "voice_urgent_old",
                     "text_new", "text_old"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, not {v!r}")

    @property
    def waiting(self) -> bool:
        return bool(self.voice_new or self.text_new)


def render(account: str, counts: Counts, *, text: bool = True) -> str:
    """The body: ``Messages-Waiting`` first (RFC 3842 §5.2), then the account and counts."""
    if _CTL.search(account):
        raise ValueError("control character in Message-Account")
    lines = [f"Messages-Waiting: {'yes' if counts.waiting else 'no'}"]
    if account:
        lines.append(f"Message-Account: {account}")
    voice = f"Voice-Message: {counts.voice_new}/{counts.voice_old}"
    if counts.voice_urgent_new or counts.voice_urgent_old:
        voice += f" ({counts.voice_urgent_new}/{counts.voice_urgent_old})"
    lines.append(voice)
    if text and (counts.text_new or counts.text_old):
        lines.append(f"Text-Message: {counts.text_new}/{counts.text_old}")
    return "\r\n".join(lines) + "\r\n"


def parse(text: str) -> Counts:
    """Counts from a body (voice and text; other classes ignored). Raises BodyError(400)."""
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n")]
    first = next((ln for ln in lines if ln.strip()), "")
    name, _, value = first.partition(":")
    if name.strip().lower() != "messages-waiting" or value.strip().lower() not in ("yes", "no"):
        raise BodyError(400, "body does not start with Messages-Waiting: yes|no")
    got: dict[str, tuple[int, int, int, int]] = {}
    for ln in lines:
        if not ln.strip():
            break  # the message headers part follows a blank line
        name, _, value = ln.partition(":")
        cls = name.strip().lower()
        if cls in ("voice-message", "text-message"):
            m = _COUNTS.match(value)
            if m is None:
                raise BodyError(400, f"bad counts in {ln.strip()!r}")
            got[cls] = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0),
                        int(m.group(4) or 0))
    v = got.get("voice-message", (0, 0, 0, 0))
    t = got.get("text-message", (0, 0, 0, 0))
    return Counts(v[0], v[1], v[2], v[3], t[0], t[1])
