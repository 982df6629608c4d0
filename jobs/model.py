"""The two small models the jobs train: the demo's flight-delay net and ``sparkbridge train``'s MLP.

Functions build them, so importing this module never imports torch.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["FlightDelayNet", "mlp", "flight_batch"]


def _flight_delay_class():
    import torch
    from torch import nn

    class _FlightDelayNet(nn.Module):
        """Embeddings for each categorical column, concatenated with the numeric ones, into an MLP."""

        def __init__(self, cardinality: dict[str, int], n_numeric: int, *, emb_dim: int = 8, hidden: int = 64):
            super().__init__()
            self.categorical = list(cardinality)
            self.embeddings = nn.ModuleList(nn.Embedding(cardinality[c], min(emb_dim, cardinality[c]))
                                            for c in self.categorical)
            width = sum(e.embedding_dim for e in self.embeddings) + n_numeric
            self.mlp = nn.Sequential(
                nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU(), nn.Linear(hidden // 2, 1)
            )

        def forward(self, cats: "torch.Tensor", nums: "torch.Tensor") -> "torch.Tensor":
            parts = [emb(cats[:, i]) for i, emb in enumerate(self.embeddings)]
            return self.mlp(torch.cat(parts + [nums], dim=1)).squeeze(1)

    return _FlightDelayNet


def FlightDelayNet(cardinality: dict[str, int], n_numeric: int, **kwargs: Any):  # noqa: N802 - a model "class"
    """The demo model: an embedding per categorical column plus the numeric ones, into an MLP."""
    return _flight_delay_class()(cardinality, n_numeric, **kwargs)


def mlp(width: int, *, hidden: int = 64, outputs: int = 1):
    """``sparkbridge train``'s model: two hidden ReLU layers. Inputs are standardized by the job
    (:mod:`jobs.standardize`), so there is no normalization layer and any batch size works."""
    from torch import nn

    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, outputs))


def flight_batch(batch: dict, categorical: Sequence[str], numeric: Sequence[str], label: str):
    """A loader batch (dict of columns) → (categorical int64 [B, C], numeric float32 [B, N], label float32 [B])."""
    import torch

    cats = torch.stack([batch[c].long() for c in categorical], dim=1)
    nums = torch.stack([batch[c].float() for c in numeric], dim=1)
    return cats, nums, batch[label].float()
