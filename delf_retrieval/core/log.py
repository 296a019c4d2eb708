"""The log callback of long runs: one line of text per call."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


Log = Callable[[str], None]
