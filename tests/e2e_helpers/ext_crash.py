"""Test extension: the script crashes (os._exit(1)) 0.3 s after each connection to Yate.

Every connection is recorded (wall-clock time) in ``<state_dir>/connects.txt``, so a test can
see how fast Yate's instant respawns turn into a backed-off crash loop.
"""

import asyncio
import os
import time


def setup(app):
    state_dir = app.config["general"]["state_dir"]

    def connected():
        os.makedirs(state_dir, exist_ok=True)
        with open(os.path.join(state_dir, "connects.txt"), "a") as f:
            f.write(f"{time.time():.6f}\n")
        asyncio.get_running_loop().call_later(0.3, os._exit, 1)

    app.engine.on_connected.append(connected)
