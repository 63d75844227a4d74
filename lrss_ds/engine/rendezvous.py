"""Where the ranks of a job on one host meet: a free loopback TCP port."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on loopback now (so parallel jobs on one host do not collide on 29500)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
