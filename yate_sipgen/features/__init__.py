"""Features: one module per SIP method or event package.

Each feature class provides ``setup(app)``, ``reconfigure(cfg)``, ``status()``, ``start()``,
``close()`` (see :class:`yate_sipgen.app.Feature`) and two class methods used by ``--check``:
``sip_methods(cfg)`` (the ``ysipchan.conf [methods]`` entries it needs) and ``yate_notes(cfg)``.
"""

from __future__ import annotations

from typing import Any


def feature_classes() -> list[type]:
    from .message import MessageFeature

    return [MessageFeature]


def all_features() -> list[Any]:
    return [cls() for cls in feature_classes()]
