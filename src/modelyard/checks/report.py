"""The result every gate returns: one verdict made of named checks, renderable for people."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str = ""
    observed: Any = None


@dataclass
class GateReport:
    gate: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def fail(self, name: str, detail: str) -> GateReport:
        """Record a failed check; returns the report, for `return report.fail(...)`."""
        self.checks.append(Check(name=name, passed=False, detail=detail))
        return self

    @property
    def failures(self) -> list[str]:
        return [
            f"{c.name}: {c.detail}" if c.detail else c.name for c in self.checks if not c.passed
        ]

    @property
    def verdict(self) -> str:
        return "passed" if self.passed else "failed"

    def to_dict(self) -> dict[str, Any]:
        return {"gate": self.gate, "passed": self.passed, **asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        lines = [
            f"## {self.gate} gate: **{self.verdict}**",
            "",
            f"{sum(c.passed for c in self.checks)} of {len(self.checks)} checks passed.",
            "",
            "| check | result | detail |",
            "|---|---|---|",
        ]
        for c in self.checks:
            detail = c.detail.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {detail} |")
        lines.extend(f"\n> {note}" for note in self.notes)
        return "\n".join(lines) + "\n"
