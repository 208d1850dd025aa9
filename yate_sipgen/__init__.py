"""yate-sipgen: a SIP messaging and presence service for Yate, run as an extmodule script.

The layers, bottom up: :mod:`.protocol` (bytes <-> typed lines), :mod:`.session` (sans-I/O
bookkeeping), :mod:`.engine` (asyncio runtime: handlers, dispatch, deadlines), :mod:`.console`
(Yate's console), :mod:`.config`, :mod:`.app` (the running script), and the features.
"""

from .engine import Engine
from .errors import (ConfigError, DispatchCancelled, DispatchTimeout, LineTooLong,
                     LocalProtocolError, RemoteProtocolError)
from .message import Message

__version__ = "0.1.0"

__all__ = ["Engine", "Message", "ConfigError", "DispatchCancelled", "DispatchTimeout",
           "LineTooLong", "LocalProtocolError", "RemoteProtocolError", "__version__"]
