"""The status file (.runner_status.json) that monitoring scripts read: written atomically on every state change."""

import json
import os
import time
from pathlib import Path

from tui.atomic import write_json_atomic

STATUS_NAME = ".runner_status.json"


class StatusFile:
    """Keeps the latest status dict and rewrites the file when it changes, but only while owns() is true: an agent
    that is refused (another one holds the repository) must not overwrite the running agent's status."""

    def __init__(self, path, owns=lambda: True, **static):
        self.path = Path(path)
        self.owns = owns
        self.written = False
        self.data = {"pid": os.getpid(), "alive": True, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **static}

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.data["last_updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        if self.written or self.owns():
            write_json_atomic(self.path, self.data)
            self.written = True

    def close(self, **fields) -> None:
        if self.written:
            self.update(alive=False, **fields)


def read_status(path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
