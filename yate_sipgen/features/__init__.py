"""Features: one module per SIP method or event package.

Each feature class provides ``setup(app)``, ``reconfigure(cfg)``, ``status()``, ``start()``,
``close()`` (see :class:`yate_sipgen.app.Feature`) and two class methods used by ``--check``:
``sip_methods(cfg)`` (the ``ysipchan.conf [methods]`` entries it needs) and ``yate_notes(cfg)``.
"""

from __future__ import annotations

from typing import Any


class BaseFeature:
    """What a feature without a reload, counters or a lifecycle of its own leaves as it is."""

    def reconfigure(self, cfg: Any) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


def feature_classes() -> list[type]:
    # imported in this order: it is the order of the sections in sipgen.conf
    from .message import MessageFeature  # noqa: I001
    from .events import EventsFeature
    from .presence import PresenceFeature
    from .dialog import DialogFeature
    from .mwi import MessageSummaryFeature
    from .winfo import WatcherInfoFeature
    from .generic import GenericFeature

    # the events core first: the packages register with it in their setup()
    return [MessageFeature, EventsFeature, PresenceFeature, DialogFeature, MessageSummaryFeature,
            WatcherInfoFeature, GenericFeature]


def schema() -> Any:
    """The sipgen.conf schema: the engine's keys, then each feature's, in this order."""
    from .. import config

    return config.Schema([config.CORE] + [cls.config for cls in feature_classes()])


def all_features() -> list[Any]:
    return [cls() for cls in feature_classes()]
