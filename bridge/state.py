"""The loader's resumable position: where in which epoch, on which data, in which order.

Mosaic resumes from a global sample count (``sample_in_epoch``); this adds the dataset identity
(the log version and its commit id) and the shuffle settings, because resuming onto other data or another
order would silently repeat some samples and skip others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from sparkbridge.errors import StateError

__all__ = ["LoaderState", "StateError", "STATE_FORMAT"]

STATE_FORMAT = "sparkbridge.loader/2"
_READABLE = ("sparkbridge.loader/1", STATE_FORMAT)
#: The order of a state saved without ``shuffle_algo`` (see :meth:`LoaderState.from_dict`).
_UNNAMED_ORDER = "py1e"




@dataclass(frozen=True)
class LoaderState:
    dataset: str  # the version's identity: "v<N>:<commit id>" (or "index:<sha256>" without a log)
    source: str
    epoch: int
    sample_in_epoch: int  # samples consumed this epoch, summed over all ranks (Mosaic's unit)
    shuffle: bool
    shuffle_seed: int
    shuffle_algo: str
    shuffle_block_size: Optional[int]
    num_canonical_nodes: Optional[int]
    initial_physical_nodes: Optional[int]
    world_size: int
    batch_size: int
    version: Optional[int] = None  # the log version read (None in states saved before the log)
    follow: Optional[dict] = None  # inside a followed first epoch: what bridge.follow needs to resume
    format: str = STATE_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "LoaderState":
        if not isinstance(obj, Mapping):
            raise StateError(f"a loader state is a dict, got {type(obj).__name__}")
        if obj.get("format") not in _READABLE:
            raise StateError(f"not a sparkbridge loader state (format={obj.get('format')!r}, expected {STATE_FORMAT!r})")
        fields = set(cls.__dataclass_fields__)
        if "shuffle_algo" not in obj:
            # a state that does not name its order predates the choice: Mosaic's py1e, the only
            # default before ``global`` became the default for shuffle=True
            obj = {**obj, "shuffle_algo": _UNNAMED_ORDER}
        missing = sorted(fields - set(obj) - {"version", "follow"})
        if missing:
            raise StateError(f"loader state lacks {missing}")
        state = cls(**{k: obj[k] for k in fields if k in obj})
        if state.epoch < 0 or state.sample_in_epoch < 0:
            raise StateError(f"loader state has a negative position: epoch {state.epoch}, sample {state.sample_in_epoch}")
        return state

    def check_compatible(self, other: "LoaderState") -> None:
        """Refuse to resume ``self`` (saved) on a loader described by ``other``."""
        if self.dataset != other.dataset:
            raise StateError(
                f"the state was saved while reading {self.source} ({self.dataset[:40]}), but this loader "
                f"reads {other.source} ({other.dataset[:40]}): resuming on other data would repeat or skip samples"
            )
        for name in ("shuffle", "shuffle_seed", "shuffle_algo"):
            if getattr(self, name) != getattr(other, name):
                raise StateError(
                    f"the state was saved with {name}={getattr(self, name)!r} but this loader has "
                    f"{name}={getattr(other, name)!r}: the remaining samples would come in another order"
                )
