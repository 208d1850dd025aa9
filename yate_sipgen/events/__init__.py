"""SIP events (RFC 6665): the subscription core shared by every event package.

* :mod:`.subscription` -- what a SUBSCRIBE asks for (Event, Expires, Accept), the subscription
  record and the table of them with its one expiry heap. Plain objects, no I/O.
* :mod:`.notifier` -- which NOTIFY goes next (cap on NOTIFYs in flight, coalescing, per-package
  pacing, initial and final NOTIFYs first) and what a NOTIFY's outcome means for the
  subscription (RFC 6665 §4.2.2, RFC 5057). Plain objects, no I/O.
* :mod:`.store` -- subscriptions, publications and package state in SQLite, so they survive a
  restart of the script or of Yate.

The packages (presence, dialog, message-summary) live in :mod:`yate_sipgen.features` and only
say how their state is gathered and rendered (:class:`.subscription.Package`).
"""
