"""Who sends an inbound request: one rule for MESSAGE, SUBSCRIBE, PUBLISH and NOTIFY.

Yate tells us two things besides the From header it does not check:

* ``username``: Yate authenticated the request (digest) as that user;
* ``in_line``: the request came in on one of Yate's lines/trunks (accounts Yate registers to,
  e.g. an SMS gateway). Only the lines listed in ``[message] trusted_lines`` (``*``: every
  line) vouch for their requests; any other line is nobody's word.

The rule (:func:`requester`):

* a request from a trusted line is vouched for, under the From user it claims (a gateway sends
  for many users; Yate sets ``username`` to the line's own account);
* otherwise an authenticated request is the ``username``'s; a From user that differs from it
  gets 403 unless the caller allows the mismatch (then the username is the identity used);
* otherwise it is unauthenticated, under its claimed From user: 403 where authentication is
  required.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..message import Message
from .validation import Refusal


@dataclass(slots=True)
class Requester:
    """The sender of one request, as :func:`requester` decided it."""

    user: str  # the identity to use: the username, or the claimed user where nobody checked
    host: str  # the From host ("" without a From)
    authenticated: bool  # Yate authenticated it (``username``)
    trusted_line: bool  # it came from a trusted line
    claimed_user: str  # the From user (else ``caller``), whatever it is worth
    vouched: bool  # authenticated or from a trusted line: someone answers for ``user``


def trusted_lines(lines: Iterable[str]) -> frozenset[str]:
    """The set :func:`requester` takes, from ``[message] trusted_lines``."""
    return frozenset(lines)


def requester(msg: Message, frm: Any, trusted: frozenset[str] | set[str],
              auth_required: bool = False, allow_from_mismatch: bool = True,
              rule: str = "auth=required") -> Requester:
    """The sender of ``msg`` (its parsed From ``frm``, or None), by the module's rule.

    Raises :class:`Refusal` 403 for an unauthenticated request where ``auth_required``
    (``rule`` names the setting, for the log), and for an authenticated one whose From user
    is not its username unless ``allow_from_mismatch``. With the defaults it refuses nothing.
    """
    get = msg.get
    username = get("username") or ""
    in_line = get("in_line") or ""
    trusted_line = bool(in_line) and ("*" in trusted or in_line in trusted)
    if frm is not None:
        claimed, host = frm.uri.user or get("caller") or "", frm.uri.host
    else:
        claimed, host = get("caller") or "", ""
    if trusted_line:
        return Requester(claimed, host, bool(username), True, claimed, True)
    if username:
        if claimed != username and not allow_from_mismatch:
            raise Refusal(403, f"From user {claimed} is not the authenticated {username}")
        return Requester(username, host, True, False, claimed, True)
    if auth_required:
        raise Refusal(403, f"not authenticated ({rule})")
    return Requester(claimed, host, False, False, claimed, False)
