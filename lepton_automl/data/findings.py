"""What data validation found, and what was done about it.

Every check ends in one of three outcomes: **fixed** (with a count, e.g. "dropped 3 duplicate
rows"), **warning** (nothing changed, but the user should know, e.g. class imbalance), or
**error** (the data cannot be used as given; the message names the file or row and the fix).
With ``strict=True`` every fix becomes an error, so that nothing is changed silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lepton_automl.exceptions import DataError
from lepton_automl.log import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class Finding:
    check: str  # a short stable name: "duplicate", "unreadable", "converted", ...
    outcome: str  # "fixed" | "warning" | "error"
    count: int
    message: str

    def __str__(self) -> str:
        return f"[{self.outcome}] {self.check}: {self.message}"


@dataclass
class Findings:
    """Collects findings while a modality loads data; ``raise_errors`` ends the load on errors."""

    source: str
    strict: bool = False
    items: list[Finding] = field(default_factory=list)

    def fixed(self, check: str, count: int, message: str) -> None:
        if count <= 0:
            return
        if self.strict:
            self.error(check, f"{message} (strict mode: fix the data, or drop --strict to let Lepton fix it)",
                       count=count)
            return
        self.items.append(Finding(check, "fixed", count, message))
        logger.info("%s: %s", self.source, message)

    def warning(self, check: str, message: str, *, count: int = 1) -> None:
        self.items.append(Finding(check, "warning", count, message))
        logger.warning("%s: %s", self.source, message)

    def error(self, check: str, message: str, *, count: int = 1) -> None:
        self.items.append(Finding(check, "error", count, message))

    def raise_errors(self) -> None:
        errors = [f for f in self.items if f.outcome == "error"]
        if errors:
            raise DataError(f"{self.source}: " + "; ".join(f.message for f in errors))

    def lines(self) -> tuple[str, ...]:
        return tuple(str(f) for f in self.items)
