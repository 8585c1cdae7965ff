"""The per-layer report: what each node does to shifts, what replaced it, and the verdict."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from afconvert.converter.rule import Verdict

__all__ = ["Finding", "OutputFinding", "Report", "NotAliasFreeError"]


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
class OutputFinding:
    """One output of the model (a tensor of its output structure) and what it does under input shifts.

    ``kind``: "invariant" (spatially constant: logits, pooled features), "equivariant" (a map of H_out x W_out
    from an H x W input: it moves by (dy H_out / H, dx W_out / W), the shift over the stride ``stride`` = H /
    H_out, W / W_out, band-limited and circular, fractional shifts included) or "flattened" (a dim mixes H and
    W, or one of them is missing: an input shift does not move it as a map; never certified). ``verdict``:
    EXACT when every node on its paths is exactly alias-free and the kind is not "flattened"."""

    name: str                       # path in the output structure: "output" for a lone tensor, "0", "stem", ...
    shape: tuple[int, ...]          # at the analysis input size
    kind: str
    stride: tuple[str, str] | None  # H / H_out, W / W_out (fractions where they do not divide)
    verdict: Verdict
    reason: str

    @property
    def relation(self) -> str:
        if self.kind == "invariant":
            return "unchanged by shifts"
        if self.kind == "equivariant":
            return "shifts by (" + ", ".join(_over(d, r) for d, r in zip(("dy", "dx"), self.stride)) + ")"
        return "not a map: no shift relation"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        d["relation"] = self.relation
        return d


def _over(d: str, stride: str) -> str:
    """``d`` divided by a stride written as "r" or "p/q": "d / r", "q d / p" or "d"."""
    p, _, q = stride.partition("/")
    num = f"{q} {d}" if q else d
    return num if p == "1" else f"{num} / {p}"


@dataclass
class Report:
    model: str
    recipe: str | None
    findings: list[Finding] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)   # empirical shift checks (``shift_check``), one per size
    numerics: dict | None = None    # max |logit| per input size (``numerics_check``)
    notes: list[str] = field(default_factory=list)
    outputs: list[OutputFinding] = field(default_factory=list)  # one per output tensor
    measurement: dict | None = None  # the float64 shift measurement that backs an exact analysis
                                     # (``certify.measure_invariance``); None when it did not run

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
        """The worst node's verdict; ``UNSTABLE`` above all when the logits are not finite and bounded;
        ``CONTRADICTED`` when the analysis finds it exact and the measurement sees its outputs move."""
        if not self.stable:
            return Verdict.UNSTABLE
        return Verdict.CONTRADICTED if self.contradicted else self.graph_verdict

    @property
    def contradicted(self) -> bool:
        """The analysis says exactly alias-free, and the measurement disagrees (or could not run)."""
        return self.graph_verdict is Verdict.EXACT and self.measurement is not None and \
            not self.measurement["agrees"]

    @property
    def certified(self) -> bool:
        """A certificate is the analysis and the measurement: every node exact, the logits finite and bounded,
        and the float64 measurement within rounding of exact."""
        return self.verdict is Verdict.EXACT and self.measurement is not None and self.measurement["agrees"]

    @property
    def disagreement(self) -> str:
        """One line on how the measurement contradicts the analysis ('' when it does not)."""
        if not self.contradicted:
            return ""
        m = self.measurement
        where = f"in float64 at {m['input_size'][0]}x{m['input_size'][1]}"
        if m["error"]:
            seen = f"the measurement could not run {where} ({m['error']})"
        else:
            seen = (f"the measurement disagrees: output '{m['output']}' moved by {m['worst']:.2e} of its largest value "
                    f"under the shift {m['shift']} {where}, above the {m['tolerance']:g} that float64 rounding allows")
        return (f"NOT certified: the analysis finds every node exactly alias-free but {seen}; a rule judged an op "
                f"exact that is not: please report this model to afconvert")

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
        """The worst verdict of a node on a spatial map or of an output (what the graph alone certifies)."""
        verdicts = [f.verdict for f in self.offenders] + [o.verdict for o in self.outputs]
        return max(verdicts, key=lambda v: v.rank, default=Verdict.EXACT)

    @property
    def graph_verdict_text(self) -> str:
        v = self.graph_verdict
        if v is Verdict.EXACT:
            if any(o.kind == "equivariant" for o in self.outputs):
                return ("certified: exactly alias-free (every output invariant or equivariant to integer and "
                        "fractional circular shifts; see the outputs table)")
            return "certified: exactly alias-free (logits invariant to integer and fractional circular shifts)"
        bad = [o for o in self.outputs if o.kind == "flattened"]
        worst = sorted(self.offenders, key=lambda f: -f.verdict.rank)     # those that decide the verdict first
        first = ", ".join([f"output {o.name} ({o.reason})" for o in bad[:3]]
                          + [f"{f.node} ({f.op}: {f.reason})" for f in worst[:max(0, 3 - len(bad))]])
        n = len(self.offenders) + len(bad)
        more = f" and {n - 3} more" if n > 3 else ""
        label = {Verdict.INTEGER: "exactly invariant to integer circular shifts only (not fractional ones)",
                 Verdict.APPROX: "approximately alias-free", Verdict.NOT: "NOT alias-free",
                 Verdict.UNKNOWN: "NOT certified (unknown ops)"}[v]
        return f"{label}: {first}{more}"

    @property
    def verdict_text(self) -> str:
        if self.stable:
            if self.contradicted:
                return self.disagreement
            if self.graph_verdict is Verdict.EXACT and self.measurement is None:
                return ("exactly alias-free by analysis, not measured (a certificate needs the measurement: "
                        "convert with check_numerics=True, audit with check=True)")
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
        if self.measurement is not None:
            lines.append(format_measurement(self.measurement))
        lines.append("verdict: " + self.verdict_text)
        if len(self.outputs) > 1 or any(o.kind != "invariant" for o in self.outputs):
            lines.append(self.outputs_table())
        lines.extend(format_check(c) for c in self.checks)
        return "\n".join(lines)

    def outputs_table(self) -> str:
        """One line per output: its path, shape, kind, stride, shift relation and verdict."""
        rows = [(o.name, "x".join(map(str, o.shape)), o.kind, "x".join(o.stride) if o.stride else "-", o.relation,
                 "certified" if o.verdict is Verdict.EXACT else f"{o.verdict.value}: {o.reason}") for o in self.outputs]
        head = ("output", "shape", "kind", "stride", "under an input shift (dy, dx)", "verdict")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in [head, *rows])

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
                "numerics": _json_numerics(self.numerics), "checks": self.checks, "measurement": self.measurement,
                "certified": self.certified,
                "findings": [f.to_dict() for f in self.findings], "outputs": [o.to_dict() for o in self.outputs]}

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


def format_measurement(m: dict) -> str:
    head = f"measurement (float64, {m['input_size'][0]}x{m['input_size'][1]}, {len(m['shifts'])} shifts, tolerance " \
        f"{m['tolerance']:g}): "
    if m["error"]:
        return head + f"could not run ({m['error']})"
    return head + f"worst {m['worst']:.1e} (output '{m['output']}', shift {m['shift']}): " + \
        ("agrees with the analysis" if m["agrees"] else "ABOVE the tolerance")


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
