"""The per-layer report: what each node does to shifts, what replaced it, and the verdict."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .rule import Verdict

__all__ = ["Finding", "Report", "NotAliasFreeError"]


class NotAliasFreeError(ValueError):
    """``strict=True`` and some node is not exactly alias-free."""


@dataclass
class Finding:
    node: str                       # module path (or graph node name for functional calls)
    op: str                         # what the node was (class or function name)
    verdict: Verdict                # after conversion
    reason: str
    replaced_by: str | None = None  # class of the replacement, when the converter swapped it
    before: Verdict | None = None   # the verdict of the source op, when it was replaced
    spatial: bool = True            # the node touches spatially varying tensors on a path to the output

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        d["before"] = self.before.value if self.before else None
        return d


@dataclass
class Report:
    model: str
    recipe: str | None
    findings: list[Finding] = field(default_factory=list)
    check: dict | None = None       # empirical shift check: {"shifts": [...], "max_rel_change": float, ...}
    notes: list[str] = field(default_factory=list)

    @property
    def offenders(self) -> list[Finding]:
        """Nodes on spatial tensors that are not exactly alias-free, in graph order."""
        return [f for f in self.findings if f.spatial and f.verdict is not Verdict.EXACT]

    @property
    def replaced(self) -> list[Finding]:
        return [f for f in self.findings if f.replaced_by]

    @property
    def verdict(self) -> Verdict:
        worst = max((f.verdict for f in self.offenders), key=lambda v: v.rank, default=Verdict.EXACT)
        return worst

    @property
    def verdict_text(self) -> str:
        v = self.verdict
        if v is Verdict.EXACT:
            return "certified: exactly alias-free (logits invariant to integer and fractional circular shifts)"
        first = ", ".join(f"{f.node} ({f.op}: {f.reason})" for f in self.offenders[:3])
        more = f" and {len(self.offenders) - 3} more" if len(self.offenders) > 3 else ""
        label = {Verdict.APPROX: "approximately alias-free", Verdict.NOT: "NOT alias-free",
                 Verdict.UNKNOWN: "NOT certified (unknown ops)"}[v]
        return f"{label}: {first}{more}"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            if f.spatial:
                out[f.verdict.value] = out.get(f.verdict.value, 0) + 1
        return out

    def summary(self) -> str:
        lines = [f"model: {self.model}" + (f"   recipe: {self.recipe}" if self.recipe else "")]
        if self.replaced:
            by_kind: dict[str, int] = {}
            for f in self.replaced:
                key = f"{f.op} -> {f.replaced_by}"
                by_kind[key] = by_kind.get(key, 0) + 1
            lines.append("replaced: " + "; ".join(f"{n} x {k}" for k, n in sorted(by_kind.items())))
        lines.append("nodes on spatial maps: " + ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items())))
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append("verdict: " + self.verdict_text)
        if self.check:
            lines.append(format_check(self.check))
        return "\n".join(lines)

    def table(self, all_nodes: bool = False) -> str:
        rows = [f for f in self.findings if all_nodes or (f.spatial and (f.replaced_by or f.verdict is not Verdict.EXACT))]
        if not rows:
            return "(no node changed or needing attention)"
        w_node = max(len(f.node) for f in rows)
        w_op = max(len(f.op) for f in rows)
        out = []
        for f in rows:
            what = f"-> {f.replaced_by}" if f.replaced_by else ""
            out.append(f"{f.node:<{w_node}}  {f.op:<{w_op}}  {f.verdict.value:<15} {what} {f.reason}".rstrip())
        return "\n".join(out)

    def to_dict(self) -> dict:
        return {"model": self.model, "recipe": self.recipe, "verdict": self.verdict.value,
                "verdict_text": self.verdict_text, "counts": self.counts(), "notes": self.notes,
                "check": self.check, "findings": [f.to_dict() for f in self.findings]}

    def __str__(self) -> str:
        return self.summary()


def format_check(check: dict) -> str:
    lines = [f"empirical check ({check['input_size'][0]}x{check['input_size'][1]}, {check['dtype']}, "
             f"max relative logit change over shifts):"]
    for label, per in check["models"].items():
        if any(v != v or v == float("inf") for v in per.values()):  # nan or inf
            lines.append(f"  {label:<10} logits not finite: the shift check cannot measure this model "
                         f"(stacked polynomial activations overflow without normalisation; fine-tune it first)")
            continue
        worst = max(per.values())
        parts = ", ".join(f"{k}: {v:.1e}" for k, v in per.items())
        lines.append(f"  {label:<10} worst {worst:.2e}   ({parts})")
    return "\n".join(lines)
