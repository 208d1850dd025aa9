"""Start/stop bookkeeping on disk: crash counting so a crash loop backs off.

Yate respawns a script with ``restart`` set at once and without back-off (reference §1.6,
Surprise 17). We record in ``state_dir/lifecycle.json`` that a run is in progress; a clean exit
(stdin EOF, SIGTERM, ``sipgen restart``) clears it. A start that finds the flag still set, from a
run that lasted less than :data:`STABLE_AFTER` seconds, counts a crash; the next start waits
``2**(crashes-1)`` seconds (capped) before doing anything.
"""

from __future__ import annotations

import json
import os
import time

STABLE_AFTER = 60.0
MAX_DELAY = 60.0


class Lifecycle:
    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "lifecycle.json")
        self.crashes = 0
        self.started = time.time()

    def _read(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self, data: dict) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except OSError as e:
            # never a reason to fail, but the operator must know crash back-off is off
            import sys

            sys.stderr.write(f"sipgen: cannot write {self.path}: {e}; crash-loop back-off "
                             "is disabled\n")

    def begin(self) -> float:
        """Record a start; returns how long to wait before starting (crash-loop back-off)."""
        prev = self._read()
        crashes = int(prev.get("crashes", 0)) if isinstance(prev.get("crashes"), int) else 0
        if prev.get("running") and self.started - float(prev.get("started", 0)) < STABLE_AFTER + 5:
            crashes += 1
        elif not prev.get("running"):
            crashes = 0
        self.crashes = crashes
        self._write({"running": True, "started": self.started, "pid": os.getpid(),
                     "crashes": crashes})
        return 0.0 if crashes <= 1 else min(2.0 ** (crashes - 1), MAX_DELAY)

    def stable(self) -> None:
        """The run survived long enough: forget earlier crashes."""
        self.crashes = 0
        self._write({"running": True, "started": self.started, "pid": os.getpid(), "crashes": 0})

    def clean_exit(self) -> None:
        self._write({"running": False, "started": self.started, "pid": os.getpid(),
                     "crashes": 0, "stopped": time.time()})
