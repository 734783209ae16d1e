"""What a fusion plan says: which BatchNorms fold into which layers, which
blocks merge, and which BNs are left and why. Made by :mod:`fusedconv.rules`,
applied by :mod:`fusedconv.apply`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Fold:
    """One layer and the BatchNorms folded into it (qualified module names, in forward order)."""

    layer: str
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()

    @property
    def batchnorms(self) -> tuple[str, ...]:
        return self.before + self.after


@dataclass(frozen=True)
class Skip:
    """A BatchNorm-like module the plan leaves in place, and why."""

    module: str
    reason: str


@dataclass
class FusionPlan:
    """What :func:`fusedconv.fuse` will fold, and what it leaves and why."""

    folds: list[Fold]
    skipped: list[Skip]
    source: str
    """Where the dataflow came from: "source" (the forward code, read without
    running it), "torch.fx" (a trace), "source+torch.fx" (the reading, completed
    by a trace where it could not vouch for every BN), "run" (one run on the
    example inputs), "graph" (the nodes of a torch.export program or an
    aten-level GraphModule, named by node), or "none" (no BatchNorm outside the merged blocks, so none
    was needed)."""
    merges: list[str] = field(default_factory=list)
    """Re-parameterizable blocks merged into one conv each (qualified names)."""

    @property
    def num_folded(self) -> int:
        return sum(len(f.batchnorms) for f in self.folds)

    def __str__(self) -> str:
        source = {"source": "the forward code", "torch.fx": "a torch.fx graph", "none": "the blocks alone",
                  "source+torch.fx": "the forward code and a torch.fx graph", "graph": "the exported graph"}.get(
            self.source, "a run on the example inputs")
        lines = [
            f"fusion plan from {source}: {len(self.merges)} blocks merge into one conv each, "
            f"{self.num_folded} BatchNorms fold into {len(self.folds)} layers, {len(self.skipped)} left"
        ]
        lines.extend(f"  merge {name}" for name in self.merges)
        for f in self.folds:
            chain = [*f.before, f"[{f.layer}]", *f.after]
            lines.append("  fold  " + " -> ".join(chain))
        for s in self.skipped:
            lines.append(f"  left  {s.module}: {s.reason}")
        return "\n".join(lines)
