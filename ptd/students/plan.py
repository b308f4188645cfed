"""What a derivation decided, layer by layer: the record behind ``ptd student``'s table."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerRow:
    """One Conv/Linear layer of the teacher and the width its student counterpart got.

    ``estimate`` is the layer's own width by the rule (its surviving weights over its student
    fan-in per output channel); ``width`` is what it got, which differs where its coupled group
    settled on another width (logged in ``StudentPlan.overrides``) or where the layer is pinned
    (the model's output layer keeps its class count).
    """

    name: str
    teacher_width: int
    estimate: int | None
    width: int
    group: str
    note: str = ""
    nnz: int = 0  # surviving weights in the pruned teacher
    weights: int = 0  # weights of the teacher layer, pruned or not
    student_weights: int = 0  # weights of the dense student layer


@dataclass
class StudentPlan:
    spec: dict[str, Any]  # the student's ptd_spec: plain JSON that rebuilds it
    layers: list[LayerRow]
    overrides: list[dict[str, Any]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    method: str = "rebuild"  # "rebuild" (family rebuilt with new widths) or "surgery" (Torch-Pruning)
    inherit: bool = False
    rule: str = ""
    round_to: int = 1  # the multiple the widths were rounded to
    round_to_choice: str = ""  # with student.round_to: auto, which multiple was taken and why

    def widths(self) -> dict[str, int]:
        """Student out-width of every Conv/Linear layer, by teacher module name."""
        return {r.name: r.width for r in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "method": self.method,
            "inherit": self.inherit,
            "rule": self.rule,
            "round_to": self.round_to,
            "round_to_choice": self.round_to_choice,
            "layers": [dataclasses.asdict(r) for r in self.layers],
            "groups": self.groups,
            "overrides": self.overrides,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def table(self) -> str:
        """The per-layer rows as a fixed-width text table."""
        head = ("layer", "teacher", "nnz", "estimate", "student", "group", "note")
        rows = [head] + [
            (r.name, str(r.teacher_width), str(r.nnz), "-" if r.estimate is None else str(r.estimate), str(r.width), r.group, r.note)
            for r in self.layers
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines) + "\n"
