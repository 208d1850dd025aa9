"""The Yate message object handlers see and build.

A :class:`Message` has a name, a return value and params. Its params follow Yate's
``NamedList``: ``msg[k]`` is the *first* param named ``k`` (what ``getParam`` returns);
duplicates (``username`` twice on an authenticated ``sip.message``, reference §6 item 4) are
kept in order and listed by :meth:`Message.getall` / :meth:`Message.items`.

**Lazy params.** A message decoded from Yate keeps its line; nothing is unescaped until a
handler asks. A request Yate hands us (a ``sip.message`` carries about 30 params and the
MESSAGE path reads about 15) is indexed on the first read: one split of the line into a dict of
wire-form values (every ``:`` of a line separates fields; one in a value is escaped), the first
value of a name winning as in Yate's ``getParam``. A value is unescaped when read, once. An
answer to one of our dispatches (it echoes our whole request and we read two params) is not
indexed: each read is one search for ``:name=``. Anything that needs the whole list
(``items()``, ``params``, ``len()``) decodes everything once; the message is an ordinary one
from then on.

**Forwarded params.** A message we build may carry, besides its params, ``forwarded``: params
copied from a message Yate handed us still in their wire form (:meth:`Message.wire_params`).
They are written after the params (Yate keeps the last of a name from a script, so a param
set explicitly must not also be forwarded) and are not visible through ``get``.

**Change tracking.** A message also records what a handler *changed*. An answer to Yate
carries only those changes: Yate applies ``k=v`` to the live message and keeps every param we
do not mention (reference §1.4.2), so echoing the whole list back (what python-yate does) is
wasted work on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

_DELETED = None  # marker in Message.changes for "send a bare key": delete every such param


class _Absent:
    __slots__ = ()

    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()  # in a lazy message's cache: deleted
_MISS = object()

#: (line, start) -> (first values, every pair when there were duplicates, else None); set by
#: the protocol module, which owns the wire format.
decode_params: Callable[[str, int], tuple[dict[str, str], list[tuple[str, str]] | None]]
#: escaped value -> value.
unescape: Callable[[str], str]
#: value -> escaped value (raises for what cannot be sent).
escape: Callable[[str], str]


_new = object.__new__

#: name -> the ":name=" a lazy message's line is searched for; ``None`` marks a name whose
#: wire form differs (escaping changes it, or it has '='). Names come from code: this stays small.
_NEEDLES: dict[str, str] = {}


#: (keys, value or None of each) -> what Message.wire_params gives for them.
_WIRE_PARAMS: dict[tuple[object, ...], str] = {}


def _needle(key: str) -> str | None:
    if type(key) is not str or "=" in key or escape(key) != key:
        return None
    if len(_NEEDLES) > 4096:
        _NEEDLES.clear()
    needle = _NEEDLES[key] = ":" + key + "="
    return needle


def _make(cls: "type[Message]", name: str, retval: str, id: str, time: int,
          params: dict[str, str], pairs: "list[tuple[str, str]] | None", line: str | None,
          pstart: int, raw: "dict[str, str] | bool | None" = None) -> "Message":
    """A Message with every attribute set, bypassing ``__init__``: the decoder makes one per
    line (``raw=None``: indexed on the first read; ``False``: each read searches the line)."""
    m = _new(cls)
    m.name = m.original_name = name
    m.retval = m.original_retval = retval
    m._p = params
    m._pairs = pairs
    m._line = line
    m._pstart = pstart
    m._raw = raw
    m._extra = m.changes = None
    m.forwarded = ""
    m.id = id
    m.time = time
    m.received_at = m.deadline = 0.0
    m.answered = m.handled = False
    return m


_split = str.split


def _index(line: str, pstart: int) -> dict[str, str]:
    """Wire-form name -> wire-form value of every param, the first of a name winning.

    Empty chunks and bare keys are skipped (as :func:`decode_params` does).
    """
    chunks = line[pstart + 1:].split(":")
    chunks.reverse()  # dict() keeps the last: reversed, that is the line's first
    try:
        return dict(map(_split, chunks, ("=",) * len(chunks), (1,) * len(chunks)))
    except ValueError:  # an empty chunk or a bare key: rare
        return dict(c.split("=", 1) for c in chunks if "=" in c)


class Reset(str):
    """A change that deletes every copy of a param and then sets one (``k:k=v``)."""

    __slots__ = ()


class Message:
    """A Yate message: name, return value, params; with change tracking for answers.

    ``msg[k]`` reads the first value of ``k`` (``KeyError`` if absent); ``msg.get(k, d)``;
    ``msg[k] = v`` sets it (Yate semantics: the first param of that name is replaced, or one is
    appended); ``del msg[k]`` removes *every* param named ``k``. Values are ``str``; bytes that are
    not UTF-8 appear as lone surrogates (``surrogateescape``) and are written back unchanged.
    """

    __slots__ = ("name", "retval", "_p", "_line", "_pstart", "_extra", "_pairs", "_raw",
                 "changes", "id", "forwarded",
                 "time", "received_at", "deadline", "original_name", "original_retval",
                 "answered", "handled")

    def __init__(self, name: str, params: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                 retval: str = "", *, id: str = "", time: int = 0) -> None:
        self.name = name
        self.original_name = name
        self.retval = retval
        self.original_retval = retval
        self._extra: list[tuple[str, str]] | None = None
        self._pairs: list[tuple[str, str]] | None = None
        self._line: str | None = None
        self._pstart = 0
        self._raw: dict[str, str] | bool | None = None
        if params is None:
            self._p: dict[str, object] = {}
        elif isinstance(params, dict):
            self._p = dict(params)
        else:
            self._p = {}
            self._load(params.items() if isinstance(params, Mapping) else params)
        self.changes: dict[str, str | None] | None = None
        self.forwarded = ""
        self.id = id
        self.time = time
        self.received_at = 0.0
        self.deadline = 0.0
        self.answered = False
        self.handled = False

    def _load(self, items: Iterable[tuple[str, str]]) -> None:
        params = self._p
        for k, v in items:
            if k in params:
                if self.extra is None:
                    self.extra = []
                self.extra.append((k, v))
            else:
                params[k] = v

    @classmethod
    def from_wire(cls, name: str, retval: str, params: dict[str, str],
                  pairs: list[tuple[str, str]] | None = None, id: str = "",
                  time: int = 0) -> "Message":
        """Build from decoded fields without copying.

        ``params`` holds the first value of each name; ``pairs``, when the line had duplicate
        names, is every pair in order: the later duplicates are sorted out only if asked for.
        """
        return _make(cls, name, retval, id, time, params, pairs, None, 0)

    @classmethod
    def from_line(cls, name: str, retval: str, line: str, pstart: int, id: str = "",
                  time: int = 0) -> "Message":
        """A message whose params stay in ``line`` (from ``pstart``, the ``:`` before the first
        param) until asked for. The line must have been checked already (escapes, chunks)."""
        return _make(cls, name, retval, id, time, {}, None, line, pstart)

    # -- the lazy part ------------------------------------------------------------------------
    def _decode_all(self) -> None:
        """Decode the whole param list once; changes made meanwhile are applied on top."""
        line = self._line
        if line is None:
            return
        params, pairs = decode_params(line, self._pstart)
        self._line = None
        self._raw = None
        for k, v in (self.changes or {}).items():
            if v is None or type(v) is Reset:
                params.pop(k, None)
                if pairs is not None:
                    pairs = [kv for kv in pairs if kv[0] != k]
            if v is not None:
                params[k] = str(v)
        self._p = params  # type: ignore[assignment]
        self._pairs = pairs

    @property
    def params(self) -> dict[str, str]:
        """The first value of every param, as a dict (decodes a lazy message)."""
        if self._line is not None:
            self._decode_all()
        return self._p  # type: ignore[return-value]

    @property
    def extra(self) -> list[tuple[str, str]] | None:
        """Later duplicates of param names, in order (``None`` when there are none)."""
        if self._line is not None:
            self._decode_all()
        if self._pairs is not None:
            seen: set[str] = set()
            extra = []
            for k, v in self._pairs:
                if k in seen:
                    extra.append((k, v))
                else:
                    seen.add(k)
            self._extra = extra or None
            self._pairs = None
        return self._extra

    @extra.setter
    def extra(self, value: list[tuple[str, str]] | None) -> None:
        self._pairs = None
        self._extra = value

    # -- mapping access -------------------------------------------------------------------
    def get(self, key: str, default: str | None = None) -> str | None:
        v = self._p.get(key, _MISS)
        if v is not _MISS:
            return default if v is _ABSENT else v  # type: ignore[return-value]
        line = self._line
        if line is None:
            return default
        raw = self._raw
        if raw is None:  # a request: index the line once
            raw = self._raw = _index(line, self._pstart)
        if raw is not False:
            if key not in _NEEDLES and _needle(key) is None:  # its wire form differs
                return self.params.get(key, default)
            v = raw.get(key)  # type: ignore[union-attr]
            if v is None:
                return default
            if "%" in v:
                v = self._p[key] = unescape(v)
            return v
        needle = _NEEDLES.get(key)
        if needle is None:
            needle = _needle(key)
            if needle is None:  # its wire form differs from the name: decode it all
                return self.params.get(key, default)
        # Every ':' of the line separates fields (a ':' in a value is escaped), so the first
        # ":key=" after the name is exactly the first param named key.
        i = line.find(needle, self._pstart)
        if i < 0:
            self._p[key] = _ABSENT  # absent: a second look costs no search
            return default
        i += len(needle)
        j = line.find(":", i)
        v = line[i:] if j < 0 else line[i:j]
        if "%" in v:
            v = unescape(v)
        self._p[key] = v
        return v

    def __getitem__(self, key: str) -> str:
        v = self.get(key)
        if v is None:
            raise KeyError(key)
        return v

    def getall(self, key: str) -> list[str]:
        """Every value of ``key``, duplicates included, in order."""
        params = self.params
        out = [params[key]] if key in params else []
        if self.extra:
            out.extend(v for k, v in self.extra if k == key)
        return out

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None  # type: ignore[arg-type]

    def __setitem__(self, key: str, value: str) -> None:
        self._p[key] = value
        if self.changes is None:
            self.changes = {}
        elif key in self.changes and (self.changes[key] is None or type(self.changes[key]) is Reset):
            # deleted (every copy) earlier: Yate must delete them too, then set one
            self.changes[key] = Reset(value)
            return
        self.changes[key] = value

    def __delitem__(self, key: str) -> None:
        """Remove every param named ``key``; absent keys are fine (a no-op, as in Yate)."""
        if self._line is not None:
            self._p[key] = _ABSENT
        else:
            self._p.pop(key, None)
            if self.extra:
                self.extra = [kv for kv in self.extra if kv[0] != key] or None
        if self.changes is None:
            self.changes = {}
        self.changes[key] = _DELETED

    def setdefault(self, key: str, value: str) -> str:
        v = self.get(key)
        if v is not None:
            return v
        self[key] = value
        return value

    def update(self, values: Mapping[str, str]) -> None:
        for k, v in values.items():
            self[k] = v

    def wire_params(self, keys: tuple[str, ...]) -> str:
        """``:k=v`` for each of ``keys`` that has a non-empty value, the value as escaped on the
        wire: params forwarded into a message of ours (``forwarded``) unchanged, without being
        unescaped and escaped again. ``keys`` are plain names (no ``%``, ``:`` or ``=``)."""
        line = self._line
        raw = self._indexed() if line is not None else False
        changes = self.changes
        if changes is None and raw is not False:  # a request from Yate, untouched: the usual
            get = raw.get  # type: ignore[union-attr]
            # the same values come again and again (one sender's connection): built once
            vals = (keys, *map(get, keys))
            wire = _WIRE_PARAMS.get(vals)
            if wire is None:
                if len(_WIRE_PARAMS) >= 4096:
                    _WIRE_PARAMS.clear()
                wire = _WIRE_PARAMS[vals] = "".join(
                    [":" + k + "=" + v for k in keys if (v := get(k))])
            return wire
        out = []
        p = self._p
        for k in keys:
            # (an indexed request gets here only with changes: the line has the rest)
            if raw is not False and k not in changes:  # type: ignore[operator]
                v = raw.get(k)  # type: ignore[union-attr]
                if v:  # as it came on the line (a value read since is only unescaped)
                    out.append(":" + k + "=" + v)
                continue
            v = p.get(k, _MISS)
            if v is not _MISS:
                if v is not _ABSENT and v:
                    out.append(":" + k + "=" + escape(v))  # type: ignore[operator]
                continue
            if line is None or raw is not False:
                continue
            needle = _NEEDLES.get(k) or _needle(k)
            i = line.find(needle, self._pstart)
            if i < 0:
                continue
            j = line.find(":", i + 1)
            if j < 0:
                j = len(line)
            if j > i + len(needle):  # a non-empty value
                out.append(line[i:j])
        return "".join(out)

    def _indexed(self) -> "dict[str, str] | bool":
        """The line's index (built now if not yet), or False for a searched message. ``get``
        does the same inline: it runs about 15 times per MESSAGE."""
        raw = self._raw
        if raw is None:
            raw = self._raw = _index(self._line, self._pstart)  # type: ignore[arg-type]
        return raw

    @classmethod
    def from_wire_params(cls, name: str, wire: str, retval: str = "") -> "Message":
        """A message whose params are given as escaped for Yate's wire (``:k=v...``, as
        :meth:`wire_params` gives them): read lazily like a line from Yate, and written to Yate
        as they are while nothing is changed. ``wire`` must follow Yate's escaping."""
        return _make(cls, name, retval, "", 0, {}, None, wire, 0)

    def unchanged_wire(self) -> str | None:
        """The params in wire form as they came (``:k=v...``), when the message still has
        them so and nothing was changed since; else ``None``."""
        if self._line is None or self.changes is not None:
            return None
        return self._line[self._pstart:]

    def wire(self, key: str) -> str | None:
        """The first value of ``key`` as escaped on Yate's wire (``None`` when absent): from
        the line as it came while that param is unchanged, else escaped now."""
        if self._line is not None and self._raw is not False and (
                self.changes is None or key not in self.changes) and (
                key in _NEEDLES or _needle(key) is not None):
            return self._indexed().get(key)  # type: ignore[union-attr]
        v = self.get(key)
        return None if v is None else escape(v)

    def wire_values(self) -> "dict[str, str] | None":
        """Every param as escaped on Yate's wire (first value of each name, names in wire
        form too), while this is a request from Yate with nothing changed yet; else ``None``
        (then use :meth:`wire` per name). Read-only: the message's own index."""
        if self._line is None or self._raw is False or self.changes is not None:
            return None
        return self._indexed()  # type: ignore[return-value]

    def has_prefix(self, prefix: str | tuple[str, ...]) -> bool:
        """Is there a param whose name starts with ``prefix`` (or one of several; plain name
        starts)?"""
        prefixes = (prefix,) if type(prefix) is str else prefix
        line = self._line
        if line is not None:
            changes = self.changes
            if changes is not None and any(v is None or type(v) is Reset
                                           for v in changes.values()):
                # a param deleted since is still on the line: decoded, then exact (rare)
                return any(k.startswith(prefixes) for k in self.params)
            # Every ':' of the line starts a param (one in a value is escaped), and a plain
            # prefix reads the same escaped: ":prefix" found is exactly a name that starts so.
            start = self._pstart
            for pre in prefixes:
                if line.find(":" + pre, start) >= 0:
                    return True
            return changes is not None and any(
                k.startswith(prefixes) for k, v in changes.items() if v is not None)
        return any(k.startswith(prefixes) for k in self._p)

    def items(self) -> Iterator[tuple[str, str]]:
        """All params in order, duplicates after the first values."""
        yield from self.params.items()
        if self.extra:
            yield from self.extra

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params) + (len(self.extra) if self.extra else 0)

    def rename(self, new_name: str) -> None:
        """Rename the live message in the answer (later Yate handlers must match the new name)."""
        self.name = new_name

    def copy(self, name: str | None = None) -> "Message":
        """A fresh message with the same params and no change record."""
        m = Message(self.name if name is None else name, self.params, self.retval)
        if self.extra:
            m.extra = list(self.extra)
        return m

    def __repr__(self) -> str:
        return f"Message({self.name!r}, id={self.id!r}, retval={self.retval!r}, params={list(self.items())!r})"
