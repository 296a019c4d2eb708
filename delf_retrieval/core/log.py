"""The log callback of long runs: one line of text per call."""

from __future__ import annotations

from collections.abc import Callable

Log = Callable[[str], None]
