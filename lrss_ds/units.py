"""Byte units shared by every module that reads or reports memory."""

from __future__ import annotations

MIB = 1024**2
GIB = 1024**3

__all__ = ["GIB", "MIB"]
