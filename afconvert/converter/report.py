"""The per-layer report: what each node does to shifts, what replaced it, and the verdict."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from afconvert.converter.rule import Verdict

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
    checks: list[dict] = field(default_factory=list)   # empirical shift checks (``shift_check``), one per size
    numerics: dict | None = None    # max |logit| per input size (``numerics_check``)
    notes: list[str] = field(default_factory=list)

    @property
    def stable(self) -> bool:
        """Finite logits bounded by the numerics check's bound at every size it ran (True if it did not run)."""
        return self.numerics is None or bool(self.numerics["stable"])

    @property
    def offenders(self) -> list[Finding]:
        """Nodes on spatial tensors that are not exactly alias-free, in graph order."""
        return [f for f in self.findings if f.spatial and f.verdict is not Verdict.EXACT]

    @property
    def replaced(self) -> list[Finding]:
        return [f for f in self.findings if f.replaced_by]

    @property
    def verdict(self) -> Verdict:
        """The worst node's verdict; ``UNSTABLE`` above all when the logits are not finite and bounded."""
        return self.graph_verdict if self.stable else Verdict.UNSTABLE

    @property
    def instability(self) -> str:
        """One line on where the logits are non-finite or too large ('' when stable)."""
        if self.stable:
            return ""
        worst = self.numerics["max_abs_logit"]
        at = ", ".join(f"{k} ({_magnitude(worst[k])})" for k in self.numerics["unstable_at"])
        return f"logits non-finite or above {self.numerics['bound']:g} on standard-normal inputs at {at}"

    @property
    def graph_verdict(self) -> Verdict:
        """The worst verdict of a node on a spatial map (what the graph alone certifies)."""
        return max((f.verdict for f in self.offenders), key=lambda v: v.rank, default=Verdict.EXACT)

    @property
    def graph_verdict_text(self) -> str:
        v = self.graph_verdict
        if v is Verdict.EXACT:
            return "certified: exactly alias-free (logits invariant to integer and fractional circular shifts)"
        first = ", ".join(f"{f.node} ({f.op}: {f.reason})" for f in self.offenders[:3])
        more = f" and {len(self.offenders) - 3} more" if len(self.offenders) > 3 else ""
        label = {Verdict.INTEGER: "exactly invariant to integer circular shifts only (not fractional ones)",
                 Verdict.APPROX: "approximately alias-free", Verdict.NOT: "NOT alias-free",
                 Verdict.UNKNOWN: "NOT certified (unknown ops)"}[v]
        return f"{label}: {first}{more}"

    @property
    def verdict_text(self) -> str:
        if self.stable:
            return self.graph_verdict_text
        graph = "every node exactly alias-free" if not self.offenders else \
            f"graph: {self.graph_verdict_text}"
        return f"numerically unstable: {self.instability} ({graph}; the outputs are unusable)"

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
        if self.numerics is not None:
            lines.append(format_numerics(self.numerics))
        lines.append("verdict: " + self.verdict_text)
        lines.extend(format_check(c) for c in self.checks)
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
                "numerics": _json_numerics(self.numerics), "checks": self.checks,
                "findings": [f.to_dict() for f in self.findings]}

    def __str__(self) -> str:
        return self.summary()


def _json_numerics(numerics: dict | None) -> dict | None:
    """JSON has no infinity: a non-finite maximum is written as the string "non-finite"."""
    if numerics is None:
        return None
    return {**numerics, "max_abs_logit": {k: "non-finite" if v == float("inf") else v
                                          for k, v in numerics["max_abs_logit"].items()}}


def _magnitude(v: float | None) -> str:
    if v is None:
        return "does not run at this size"
    return "non-finite" if v == float("inf") else f"max |logit| {v:.3g}"


def format_numerics(numerics: dict) -> str:
    sizes = ", ".join(f"{k}: {_magnitude(v)}" for k, v in numerics["max_abs_logit"].items())
    return f"numerics ({numerics['dtype']}, standard-normal input, bound {numerics['bound']:g}): {sizes}"


def format_check(check: dict) -> str:
    lines = [f"empirical check ({check['input_size'][0]}x{check['input_size'][1]}, {check['dtype']}, "
             f"max relative logit change over shifts):"]
    for label, per in check["models"].items():
        if any(v != v or v == float("inf") for v in per.values()):  # nan or inf
            lines.append(f"  {label:<10} logits not finite: the shift check cannot measure this model "
                         f"(numerically unstable)")
            continue
        worst = max(per.values())
        parts = ", ".join(f"{k}: {v:.1e}" for k, v in per.items())
        lines.append(f"  {label:<10} worst {worst:.2e}   ({parts})")
    return "\n".join(lines)
