"""`CompressionReport`: what compression did to each module, as a table and as JSON."""

import json
from dataclasses import asdict, dataclass, field


@dataclass
class ModuleReport:
    name: str
    shape: tuple[int, int]
    rank: int
    params_before: int
    params_after: int
    relative_error: float
    activation_error: float | None = None
    seconds: float = 0.0


@dataclass
class CompressionReport:
    method: str
    keep: float
    modules: list[ModuleReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    @property
    def kept(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_dict(self) -> dict:
        return {"method": self.method, "keep": self.keep, "kept": self.kept,
                "params_before": self.params_before, "params_after": self.params_after,
                "seconds": self.seconds, "modules": [asdict(m) for m in self.modules]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "CompressionReport":
        modules = [ModuleReport(**{**m, "shape": tuple(m["shape"])}) for m in data["modules"]]
        return cls(method=data["method"], keep=data["keep"], modules=modules,
                   seconds=data["seconds"])

    def __str__(self) -> str:
        header = (f"{'module':<48} {'shape':>12} {'rank':>5} {'before':>10} {'after':>10} "
                  f"{'rel.err':>8} {'act.err':>8} {'s':>6}")
        lines = [f"{self.method}: keep {self.keep:g} of the targeted weights", header,
                 "-" * len(header)]
        for m in self.modules:
            act = "" if m.activation_error is None else f"{m.activation_error:.4f}"
            lines.append(f"{m.name[-48:]:<48} {m.shape[0]:>5}×{m.shape[1]:<6} {m.rank:>5} "
                         f"{m.params_before:>10,} {m.params_after:>10,} "
                         f"{m.relative_error:>8.4f} {act:>8} {m.seconds:>6.2f}")
        lines.append("-" * len(header))
        lines.append(f"{len(self.modules)} modules: {self.params_before:,} → "
                     f"{self.params_after:,} parameters ({self.kept:.3f} kept) "
                     f"in {self.seconds:.2f} s")
        return "\n".join(lines)
