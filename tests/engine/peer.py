"""A stand-in for a client connection, as the engine's facade sees one
(`supervisor.engine.operation.Peer`): this test process's credentials, and
notifications dropped."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class Peer:
    id: int = 1
    uid: int = os.getuid()
    gid: int = os.getgid()
    pid: int = os.getpid()

    def notify(self, method: str, params: object) -> None:
        pass
