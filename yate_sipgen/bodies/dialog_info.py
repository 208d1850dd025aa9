"""dialog-info documents (RFC 4235) for busy lamp fields."""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from .pidf import _clean

CONTENT_TYPE = "application/dialog-info+xml"
NS = "urn:ietf:params:xml:ns:dialog-info"
STATES = ("trying", "proceeding", "early", "confirmed", "terminated")
EVENTS = ("", "cancelled", "rejected", "replaced", "local-bye", "remote-bye", "error",
          "timeout")
DIRECTIONS = ("", "initiator", "recipient")
#: Which dialog a phone that shows one should see (single=True): the most important.
_WEIGHT = {"confirmed": 4, "early": 3, "proceeding": 2, "trying": 1, "terminated": 0}


@dataclass(frozen=True, slots=True)
class Dialog:
    """One dialog of the user. ``event``/``code`` only for ``terminated`` (``rejected`` is an
    event, never a state: the draft-era ``notify-state`` of Yate's sipfeatures is not used)."""

    id: str
    state: str
    direction: str = ""
    call_id: str = ""
    local_identity: str = ""
    remote_identity: str = ""
    remote_display: str = ""
    event: str = ""
    code: int = 0
    duration: int | None = None

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"dialog state {self.state!r}")
        if self.event not in EVENTS:
            raise ValueError(f"dialog event {self.event!r}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"dialog direction {self.direction!r}")
        if not self.id:
            raise ValueError("dialog without id")


def _attr(name: str, value: str) -> str:
    return f" {name}={quoteattr(_clean(value))}"


def _dialog(d: Dialog, remote: bool) -> str:
    out = ["<dialog", _attr("id", d.id)]
    if d.call_id:
        out.append(_attr("call-id", d.call_id))
    if d.direction:
        out.append(_attr("direction", d.direction))
    out.append("><state")
    if d.state == "terminated" and d.event:
        out.append(_attr("event", d.event))
    if d.state == "terminated" and d.code:
        out.append(_attr("code", str(d.code)))
    out.append(f">{d.state}</state>")
    if d.duration is not None and d.state == "confirmed":
        out.append(f"<duration>{max(0, int(d.duration))}</duration>")
    if d.local_identity:
        out.append(f"<local><identity>{escape(_clean(d.local_identity))}</identity></local>")
    if remote and d.remote_identity:
        disp = _attr("display", d.remote_display) if d.remote_display else ""
        out.append(f"<remote><identity{disp}>{escape(_clean(d.remote_identity))}</identity>"
                   "</remote>")
    out.append("</dialog>")
    return "".join(out)


_HEAD = f'<?xml version="1.0" encoding="UTF-8"?>\n<dialog-info xmlns="{NS}" version="'


def template(entity: str, dialogs: list[Dialog], *, remote_identities: bool = True,
             single: bool = False) -> tuple[str, str]:
    """A full-state document (``state="full"``) for ``entity``'s dialogs, in two parts around
    its ``version`` (which differs per subscription, RFC 4235 §4.1): ``before + str(version) +
    after`` is the document (:func:`with_version`). An empty list is an idle user.
    ``single``: only the most important dialog."""
    if single and dialogs:
        best = max(range(len(dialogs)), key=lambda i: (_WEIGHT[dialogs[i].state], i))
        dialogs = [dialogs[best]]
    rest = f'" state="full"{_attr("entity", entity)}'
    if not dialogs:
        return _HEAD, rest + "/>"
    return _HEAD, rest + ">" + "".join(_dialog(d, remote_identities) for d in dialogs) + \
        "</dialog-info>"


def with_version(parts: tuple[str, str], version: int) -> str:
    """The document of :func:`template` ``parts`` at ``version``."""
    return parts[0] + str(int(version)) + parts[1]


def render(entity: str, version: int, dialogs: list[Dialog], *, remote_identities: bool = True,
           single: bool = False) -> str:
    """The full-state document at ``version`` (see :func:`template`)."""
    return with_version(template(entity, dialogs, remote_identities=remote_identities,
                                 single=single), version)
