"""The Yate message object handlers see and build.

A :class:`Message` keeps its params in a dict (first value of each name, which is what Yate's
``NamedList::getParam`` returns) plus, rarely, a list of later duplicates (Yate sends every
duplicate, e.g. ``username`` twice on an authenticated ``sip.message``, reference §6 item 4).

It also records what a handler *changed*. An answer to Yate carries only those changes: Yate
applies ``k=v`` to the live message and keeps every param we do not mention (reference §1.4.2),
so echoing the whole list back (what python-yate does) is wasted work on the hot path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

_DELETED = None  # marker in Message.changes for "send a bare key": delete every such param


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

    __slots__ = ("name", "retval", "params", "_extra", "_pairs", "changes", "id", "time",
                 "received_at", "deadline", "original_name", "original_retval", "answered",
                 "handled")

    def __init__(self, name: str, params: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
                 retval: str = "", *, id: str = "", time: int = 0) -> None:
        self.name = name
        self.original_name = name
        self.retval = retval
        self.original_retval = retval
        self._extra: list[tuple[str, str]] | None = None
        self._pairs: list[tuple[str, str]] | None = None
        if params is None:
            self.params: dict[str, str] = {}
        elif isinstance(params, dict):
            self.params = dict(params)
        else:
            self.params = {}
            self._load(params.items() if isinstance(params, Mapping) else params)
        self.changes: dict[str, str | None] | None = None
        self.id = id
        self.time = time
        self.received_at = 0.0
        self.deadline = 0.0
        self.answered = False
        self.handled = False

    def _load(self, items: Iterable[tuple[str, str]]) -> None:
        params = self.params
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
        """Build from decoded fields without copying (used by the codec).

        ``params`` holds the first value of each name; ``pairs``, when the line had duplicate
        names, is every pair in order: the later duplicates are sorted out only if asked for.
        """
        m = cls.__new__(cls)
        m.name = m.original_name = name
        m.retval = m.original_retval = retval
        m.params = params
        m._extra = None
        m._pairs = pairs
        m.changes = None
        m.id = id
        m.time = time
        m.received_at = 0.0
        m.deadline = 0.0
        m.answered = False
        m.handled = False
        return m

    @property
    def extra(self) -> list[tuple[str, str]] | None:
        """Later duplicates of param names, in order (``None`` when there are none)."""
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
    def __getitem__(self, key: str) -> str:
        return self.params[key]

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.params.get(key, default)

    def getall(self, key: str) -> list[str]:
        """Every value of ``key``, duplicates included, in order."""
        out = [self.params[key]] if key in self.params else []
        if self.extra:
            out.extend(v for k, v in self.extra if k == key)
        return out

    def __contains__(self, key: object) -> bool:
        return key in self.params

    def __setitem__(self, key: str, value: str) -> None:
        self.params[key] = value
        if self.changes is None:
            self.changes = {}
        elif key in self.changes and (self.changes[key] is None or type(self.changes[key]) is Reset):
            # deleted (every copy) earlier: Yate must delete them too, then set one
            self.changes[key] = Reset(value)
            return
        self.changes[key] = value

    def __delitem__(self, key: str) -> None:
        """Remove every param named ``key``; absent keys are fine (a no-op, as in Yate)."""
        self.params.pop(key, None)
        if self.extra:
            self.extra = [kv for kv in self.extra if kv[0] != key] or None
        if self.changes is None:
            self.changes = {}
        self.changes[key] = _DELETED

    def setdefault(self, key: str, value: str) -> str:
        if key in self.params:
            return self.params[key]
        self[key] = value
        return value

    def update(self, values: Mapping[str, str]) -> None:
        for k, v in values.items():
            self[k] = v

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
