"""Per-layer sparsity report of a mask set: an aligned text table and JSON rows."""
from __future__ import annotations

from ptd.pruning.masks import Masks, layer_report


def layer_json(masks: Masks) -> list[dict]:
    """One dict per layer (layer, shape, total, alive, sparsity as a fraction), in mask order."""
    return layer_report(masks)


def layer_table(masks: Masks) -> str:
    """Aligned text table: layer, shape, total, alive, sparsity %, and a total row."""
    rows = layer_report(masks)
    total = sum(r["total"] for r in rows)
    alive = sum(r["alive"] for r in rows)
    body = [[r["layer"], "x".join(str(d) for d in r["shape"]), str(r["total"]), str(r["alive"]), f"{100 * r['sparsity']:.2f}"] for r in rows]
    foot = ["total", "", str(total), str(alive), f"{100 * (1 - alive / total) if total else 0.0:.2f}"]
    head = ["layer", "shape", "total", "alive", "sparsity %"]
    widths = [max(len(r[i]) for r in [head, foot, *body]) for i in range(5)]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), rule, *(fmt(r) for r in body), rule, fmt(foot)])
