"""Parsing XML bodies from SIP requests without trusting them.

A PUBLISH body comes from anyone who can reach Yate. ``xml.etree`` expands internal entities
("billion laughs") and would parse a DOCTYPE, so both are refused before the parser sees the
text; size is checked first of all.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

#: ``<!`` that starts neither a comment nor a CDATA section: DOCTYPE, ENTITY, ELEMENT, ...
_DECL = re.compile(r"<!(?!--|\[CDATA\[)")
#: A processing instruction other than the XML declaration at the very start.
_PI = re.compile(r"<\?(?!xml[\s?])", re.I)


class BodyError(ValueError):
    """A body we refuse: ``code`` is the SIP answer (400 malformed, 413 too large)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


def parse_xml(text: str, *, max_bytes: int, namespace: str, root: str) -> ET.Element:
    """The root element of ``text``; raises :class:`BodyError`.

    413 when the UTF-8 text is over ``max_bytes``; 400 for a DOCTYPE or any other markup
    declaration (entities), a processing instruction, text that is not well-formed, or a root
    other than ``{namespace}root``.
    """
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))
    if size > max_bytes:
        raise BodyError(413, f"body of {size} bytes (at most {max_bytes})")
    if _DECL.search(text):
        raise BodyError(400, "DOCTYPE or entity declarations are not accepted")
    if _PI.search(text):
        raise BodyError(400, "processing instructions are not accepted")
    try:
        parser = ET.XMLParser()
        parser.feed(text)
        elem = parser.close()
    except ET.ParseError as e:
        raise BodyError(400, f"not well-formed XML ({e})") from None
    except (ValueError, UnicodeError) as e:
        raise BodyError(400, f"unreadable XML ({e})") from None
    if elem.tag != f"{{{namespace}}}{root}":
        raise BodyError(400, f"root element {elem.tag!r} is not {root} of {namespace}")
    return elem
