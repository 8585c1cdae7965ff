"""What a conversion decided, attached to the converted model as ``model.afconvert_info``: the recipe and its
options, the analysis input size and channels, the replaced module paths, whether the result is a traced graph
module, and the source model (library, name, arguments, weights) when it was built by name. Plain data:
``to_dict`` / ``from_dict`` round-trip it through a checkpoint."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["ConversionInfo"]


@dataclass
class ConversionInfo:
    recipe: str                     # the recipe's name
    options: dict                   # its options, as the recipe's ``to_dict`` gives them
    input_size: tuple[int, int]     # (H, W) of the layout analysis and the checks
    in_chans: int
    replaced: list[str] = field(default_factory=list)   # module paths swapped (or ``<node>_af`` for functional calls)
    graph_module: bool = False      # functional calls were rewritten: the model is the traced graph module
    source: dict | None = None      # ``SourceSpec.to_dict()`` of the source model, when built by name

    def __post_init__(self):
        self.input_size = tuple(int(v) for v in self.input_size)
        self.replaced = sorted(self.replaced)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ConversionInfo":
        return cls(**{k: d[k] for k in ("recipe", "options", "input_size", "in_chans") if k in d},
                   replaced=list(d.get("replaced", [])), graph_module=bool(d.get("graph_module", False)),
                   source=d.get("source"))
