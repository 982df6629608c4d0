"""Per-feature mean and standard deviation from one streaming pass, and the transform they define.

Why: a small MLP fitted to raw features and a raw target learns nothing useful when their scales
differ by orders of magnitude (body mass in grams: the MSE sat at 1.8e7). The statistics come from
the dataset itself, read batch by batch through ``bridge.StreamingLoader`` (never collected), merged
with Chan's parallel formula in float64 (stable for large means and many rows). NaNs are skipped
per column; a column with no finite value gets mean 0, std 1; a constant column gets std 1, so the
transform is always finite. Under torchrun each rank reads its share and the per-rank statistics
are merged across ranks (Mosaic pads uneven shares with at most ``world - 1`` repeated rows, which
moves the statistics by a negligible amount).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = ["Standardization", "RunningMoments", "compute_standardization", "feature_names"]

log = logging.getLogger(__name__)


def feature_names(parts: Sequence[tuple[str, int]]) -> list[str]:
    """One name per feature position: ``col`` for a scalar column, ``col[i]`` for array columns."""
    names: list[str] = []
    for col, width in parts:
        names += [col] if width == 1 else [f"{col}[{i}]" for i in range(width)]
    return names


class RunningMoments:
    """Count, mean and sum of squared deviations per column, NaN-aware, mergeable (Chan et al.)."""

    def __init__(self, width: int) -> None:
        import torch

        self.n = torch.zeros(width, dtype=torch.float64)
        self.mean = torch.zeros(width, dtype=torch.float64)
        self.m2 = torch.zeros(width, dtype=torch.float64)

    def update(self, x: Any) -> None:
        """Add a [rows, width] batch (any float dtype, NaN/inf = missing)."""
        import torch

        x = x.detach().to("cpu", torch.float64)
        if x.dim() == 1:
            x = x.reshape(-1, 1)
        ok = torch.isfinite(x)
        n_b = ok.sum(dim=0, dtype=torch.float64)
        vals = torch.where(ok, x, torch.zeros((), dtype=torch.float64))
        mean_b = vals.sum(dim=0) / n_b.clamp(min=1)
        dev = torch.where(ok, x - mean_b, torch.zeros((), dtype=torch.float64))
        m2_b = (dev * dev).sum(dim=0)
        self._merge(n_b, mean_b, m2_b)

    def _merge(self, n_b: Any, mean_b: Any, m2_b: Any) -> None:
        n = self.n + n_b
        safe = n.clamp(min=1)
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / safe
        self.m2 = self.m2 + m2_b + delta * delta * self.n * n_b / safe
        self.n = n

    def merge(self, other: "RunningMoments") -> None:
        self._merge(other.n, other.mean, other.m2)

    def all_ranks(self) -> "RunningMoments":
        """The moments over every rank's rows (a no-op without a process group)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        mine = torch.stack([self.n, self.mean, self.m2])
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        if dist.get_backend() == "nccl":  # NCCL moves CUDA tensors only
            dev = torch.device("cuda", torch.cuda.current_device())
            gathered_dev = [g.to(dev) for g in gathered]
            dist.all_gather(gathered_dev, mine.to(dev))
            gathered = [g.cpu() for g in gathered_dev]
        else:
            dist.all_gather(gathered, mine)
        total = RunningMoments(mine.shape[1])
        for g in gathered:
            total._merge(g[0], g[1], g[2])
        return total

    def mean_std(self) -> tuple[list[float], list[float], list[int]]:
        """(mean, population std, finite count) per column; 0/1 for empty columns, std 1 if constant."""
        import torch

        std = torch.sqrt(self.m2 / self.n.clamp(min=1))
        means, stds = [], []
        for n, m, s in zip(self.n.tolist(), self.mean.tolist(), std.tolist()):
            means.append(m if n > 0 and math.isfinite(m) else 0.0)
            stds.append(s if n > 0 and math.isfinite(s) and s > 1e-12 * max(1.0, abs(m)) else 1.0)
        return means, stds, [int(n) for n in self.n.tolist()]


@dataclass(frozen=True)
class Standardization:
    """``(x - mean) / std`` per feature (NaN → 0, i.e. the mean) and the same for a regression target."""

    features: list[str]
    mean: list[float]
    std: list[float]
    rows: int
    target: Optional[str] = None
    target_mean: float = 0.0
    target_std: float = 1.0  # 1.0 and mean 0.0: the target is left as it is (binary labels)
    finite: list[int] = field(default_factory=list)  # finite values seen per feature

    def apply(self, x: Any) -> Any:
        import torch

        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)
        return torch.nan_to_num((x - mean) / std, nan=0.0, posinf=0.0, neginf=0.0)

    def apply_target(self, y: Any) -> Any:
        return (y - self.target_mean) / self.target_std

    def target_to_original(self, y: Any) -> Any:
        return y * self.target_std + self.target_mean

    @property
    def loss_scale(self) -> float:
        """A squared error in standardized units times this is the same error in the target's units."""
        return self.target_std ** 2

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "mean": list(self.mean), "std": list(self.std), "rows": self.rows,
                "target": self.target, "target_mean": self.target_mean, "target_std": self.target_std,
                "finite": list(self.finite)}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "Standardization":
        return cls(features=list(obj["features"]), mean=[float(v) for v in obj["mean"]],
                   std=[float(v) for v in obj["std"]], rows=int(obj["rows"]), target=obj.get("target"),
                   target_mean=float(obj.get("target_mean", 0.0)), target_std=float(obj.get("target_std", 1.0)),
                   finite=[int(v) for v in obj.get("finite", [])])


def compute_standardization(
    batches: Iterable[tuple[Any, Any]],
    *,
    features: Sequence[str],
    target: Optional[str],
    standardize_target: bool,
    progress: Any = None,
) -> Standardization:
    """One pass over ``(x [B, F], y [B])`` batches (e.g. a ``StreamingLoader`` with features/label).

    ``progress``, when given, is called with the rows of each batch (a tqdm bar's ``update``).
    """
    feats: Optional[RunningMoments] = None
    tgt: Optional[RunningMoments] = None
    rows = 0
    for x, y in batches:
        if feats is None:
            feats, tgt = RunningMoments(x.shape[1]), RunningMoments(1)
        feats.update(x)
        if standardize_target:
            tgt.update(y.reshape(-1, 1))
        rows += int(x.shape[0])
        if progress is not None:
            progress(int(x.shape[0]))
    if feats is None:
        feats, tgt = RunningMoments(len(features)), RunningMoments(1)
    feats, tgt = feats.all_ranks(), tgt.all_ranks()
    rows = _sum_over_ranks(rows)
    mean, std, finite = feats.mean_std()
    for name, n in zip(features, finite):
        if n == 0:
            log.warning("feature %r has no finite value in %d rows: it is fed to the model as 0", name, rows)
    t_mean, t_std = 0.0, 1.0
    if standardize_target:
        (t_mean,), (t_std,), (t_n,) = tgt.mean_std()
        if t_n == 0:
            log.warning("target %r has no finite value in %d rows", target, rows)
    return Standardization(features=list(features), mean=mean, std=std, rows=rows, target=target,
                           target_mean=t_mean, target_std=t_std, finite=finite)


def _sum_over_ranks(value: int) -> int:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    v = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        v = v.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(v)
    return int(v.cpu()[0])
