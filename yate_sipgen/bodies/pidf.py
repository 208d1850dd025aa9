"""PIDF presence documents (RFC 3863): check what is PUBLISHed, compose what watchers get."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

from .xml import BodyError, parse_xml

CONTENT_TYPE = "application/pidf+xml"
NS = "urn:ietf:params:xml:ns:pidf"
_T = f"{{{NS}}}"

#: Conventional prefixes of the namespaces presence documents use (RFC 4479, 4480, 4482,
#: 5196), so a composed document reads as phones expect; others get ElementTree's ``nsN``.
PREFIXES = {
    "urn:ietf:params:xml:ns:pidf:data-model": "dm",
    "urn:ietf:params:xml:ns:pidf:rpid": "rpid",
    "urn:ietf:params:xml:ns:pidf:cipid": "c",
    "urn:ietf:params:xml:ns:pidf:caps": "caps",
    "urn:ietf:params:xml:ns:pidf:status:rpid": "rpid-status",
}
for _uri, _prefix in PREFIXES.items():
    ET.register_namespace(_prefix, _uri)

_HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'


def _clean(text: str) -> str:
    """Drop what XML 1.0 cannot carry (control characters, lone surrogates)."""
    return "".join(ch for ch in text if ch in "\t\n\r" or (" " <= ch and not
                                                          "\ud800" <= ch <= "\udfff"
                                                          and ch not in "\ufffe\uffff"))


def validate(text: str, max_bytes: int = 16384) -> ET.Element:
    """Check a PUBLISHed document: well-formed, no DOCTYPE/entities, root ``presence`` of the
    PIDF namespace, every ``tuple`` with an ``id`` and a ``status``. Raises :class:`BodyError`."""
    root = parse_xml(text, max_bytes=max_bytes, namespace=NS, root="presence")
    for t in root.iter(_T + "tuple"):
        if not t.get("id"):
            raise BodyError(400, "a tuple without id")
        if t.find(_T + "status") is None:
            raise BodyError(400, f"tuple {t.get('id')!r} without status")
    return root


def compose(entity: str, documents: list[str]) -> str:
    """What watchers of ``entity`` get: nothing published -> :func:`closed`; one document ->
    that document, byte for byte; several -> one PIDF document with every tuple and every other
    element of all of them (in order), ids made unique, one ``entity``, the namespaces kept
    with readable prefixes (never ``ns0``)."""
    if not documents:
        return closed(entity)
    if len(documents) == 1:
        return documents[0]
    root = ET.Element(_T + "presence", {"entity": _clean(entity)})
    seen: set[str] = set()
    tuples: list[ET.Element] = []
    others: list[ET.Element] = []
    prefixes: dict[str, str] = {}  # the publishers' own prefixes, for namespaces we do not know
    for doc in documents:
        try:
            src = _parse_keeping_prefixes(doc, prefixes)
        except ET.ParseError:
            continue  # checked when published; a damaged stored row is skipped
        for child in list(src):
            is_tuple = child.tag == _T + "tuple"
            if is_tuple or child.get("id") is not None:
                # ids unique in the document: tuples (RFC 3863), persons and devices (RFC 4479)
                tid = base = child.get("id") or "t"
                n = 2
                while tid in seen:
                    tid = f"{base}-{n}"
                    n += 1
                seen.add(tid)
                child.set("id", tid)
            (tuples if is_tuple else others).append(child)
    for child in tuples + others:  # RFC 3863 §4.1: tuples come first, then notes, extensions
        root.append(child)
    return _HEAD + _serialize(root, prefixes)


_XML_NS = "http://www.w3.org/XML/1998/namespace"


def _parse_keeping_prefixes(doc: str, prefixes: dict[str, str]) -> ET.Element:
    """Parse ``doc``; note in ``prefixes`` (uri -> prefix) the prefixes it declares."""
    parser = ET.XMLPullParser(events=("start-ns",))
    parser.feed(doc)
    parser.close()
    for _, (prefix, uri) in parser.read_events():
        if prefix and uri not in prefixes:
            prefixes[uri] = prefix
    return ET.fromstring(doc)


def _serialize(root: ET.Element, seen: dict[str, str]) -> str:
    """``root`` as text, with the PIDF namespace as the default one and every other namespace
    declared once on the root under a readable prefix: the conventional one
    (:data:`PREFIXES`), else the one its publisher used, else ``pN``. (ElementTree's own
    writer names them ``ns0``... and cannot keep PIDF's unqualified attributes with a default
    namespace.)"""
    names: dict[str, str] = {}  # uri -> prefix, declared on the root
    taken: set[str] = set()

    def prefix_of(uri: str) -> str:
        p = names.get(uri)
        if p is None:
            p = PREFIXES.get(uri) or seen.get(uri) or ("pidf" if uri == NS else "p")
            base, n = p, 1
            while p in taken or p.lower().startswith("xml"):
                p = f"{base}{n}"
                n += 1
            names[uri] = p
            taken.add(p)
        return p

    def qname(name: str, attribute: bool) -> str:
        if name[:1] != "{":
            return name
        uri, _, local = name[1:].partition("}")
        if uri == _XML_NS:
            return "xml:" + local
        if uri == NS and not attribute:  # the default namespace (never an attribute's)
            return local
        return f"{prefix_of(uri)}:{local}"

    def start(e: ET.Element) -> str:
        return "<" + qname(str(e.tag), False) + "".join(
            f" {qname(k, True)}={quoteattr(_clean(v))}" for k, v in e.attrib.items())

    def write(e: ET.Element, out: list[str]) -> None:
        out.append(start(e))
        if len(e) or e.text:
            out.append(">")
            if e.text:
                out.append(escape(_clean(e.text)))
            for child in e:
                write(child, out)
            out.append(f"</{qname(str(e.tag), False)}>")
        else:
            out.append("/>")
        if e.tail:
            out.append(escape(_clean(e.tail)))

    inner: list[str] = []
    for child in root:
        write(child, inner)
    head = start(root)  # after the children: every prefix is known now
    decls = "".join(f" xmlns:{p}={quoteattr(uri)}" for uri, p in names.items())
    tag = qname(str(root.tag), False)
    return f'<{tag} xmlns="{NS}"{decls}{head[len(tag) + 1:]}>{"".join(inner)}</{tag}>'


def open_or_closed(entity: str, is_open: bool, tuple_id: str = "sipgen",
                   contact: str = "") -> str:
    """A one-tuple document saying ``open`` or ``closed`` (presence from registrations)."""
    parts = [_HEAD, f'<presence xmlns="{NS}" entity={quoteattr(_clean(entity))}>',
             f"<tuple id={quoteattr(_clean(tuple_id))}><status><basic>",
             "open" if is_open else "closed", "</basic></status>"]
    if contact:
        parts.append(f"<contact>{escape(_clean(contact))}</contact>")
    parts.append("</tuple></presence>")
    return "".join(parts)


def closed(entity: str, tuple_id: str = "sipgen") -> str:
    """The document of a presentity that published nothing."""
    return open_or_closed(entity, False, tuple_id)


def basic(text: str) -> str:
    """``open`` if any tuple is open, ``closed`` if some say closed and none open, else ""."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return ""
    values = [(b.text or "").strip() for b in root.iter(_T + "basic")]
    if "open" in values:
        return "open"
    return "closed" if values else ""
