"""``LoaderOptions``: every setting of a :class:`~sparkbridge.bridge.loader.StreamingLoader`, validated once.

Why one frozen object: the loader's stages (the epoch sources, the shard source, batch assembly,
the transform and device stages) each read a few settings; handing them this object (or the
fields they need) instead of the loader keeps each stage testable on its own and makes a setting
impossible to change half-way through a run. ``StreamingLoader`` builds it from its keyword
arguments, so its signature (and every error message) is unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence, Union

from sparkbridge.bridge.order import ShuffleAlgo
from sparkbridge.errors import UsageError

__all__ = ["LoaderOptions"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class LoaderOptions:
    """The loader's settings (see :class:`~sparkbridge.bridge.loader.StreamingLoader` for each).

    Normalized on construction: ``validate_hash=True`` becomes None (pick what the index has) and
    ``transform_workers=None`` becomes ``num_workers`` with a transform, else 0; ``shuffle_algo``
    becomes a :class:`~sparkbridge.bridge.order.ShuffleAlgo`. The device is kept
    as given; :func:`sparkbridge.bridge.device.resolve_device` checks it where torch is imported."""

    remote_or_local: Union[str, os.PathLike]
    local: Optional[Union[str, os.PathLike]] = None
    batch_size: int
    shuffle: bool = False
    seed: int = 9176
    columns: Optional[Sequence[str]] = None
    features: Optional[Sequence[str]] = None
    label: Optional[str] = None
    device: Any = None
    drop_last: bool = False
    pad_ranks: bool = True
    num_workers: int = 0
    shuffle_algo: Optional[Union[ShuffleAlgo, str]] = None
    shuffle_block_size: Optional[int] = None
    num_canonical_nodes: Optional[int] = None
    partition_algo: str = "relaxed"
    cache_limit: Optional[Union[int, str]] = None
    predownload: Optional[int] = None
    validate_hash: Union[str, bool, None] = None
    pin_memory: Optional[bool] = None
    prefetch: int = 2
    decoded_cache_bytes: Optional[int] = None
    download_retry: int = 2
    download_timeout: float = 60.0
    clean_stale_shm: bool = True
    version: Optional[int] = None
    follow: bool = False
    follow_timeout: float = 600.0
    follow_idle_timeout: Optional[float] = 60.0
    follow_poll: float = 0.2
    follow_shuffle_rows: Optional[int] = None
    transform: Optional[Callable[[Any], Any]] = None
    transform_workers: Optional[int] = None

    def __post_init__(self) -> None:
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {self.num_workers!r}")
        if not isinstance(self.download_retry, int) or self.download_retry < 1:
            raise ValueError(f"download_retry is the number of download attempts (>= 1), got {self.download_retry!r}")
        if not isinstance(self.prefetch, int) or self.prefetch < 1:
            raise ValueError(f"prefetch must be an int >= 1, got {self.prefetch!r}")
        if self.shuffle_algo is not None:
            object.__setattr__(self, "shuffle_algo", ShuffleAlgo.parse(self.shuffle_algo))
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if isinstance(self.validate_hash, str) and not self.validate_hash:
            raise ValueError("validate_hash must be a hash name such as 'xxh64', True/None (auto) or False")
        if self.validate_hash is True:
            object.__setattr__(self, "validate_hash", None)
        if self.transform is not None and not callable(self.transform):
            raise ValueError(f"transform must be a callable taking a batch, got {type(self.transform).__name__}")
        if self.transform_workers is None:
            object.__setattr__(self, "transform_workers", self.num_workers if self.transform is not None else 0)
        tw = self.transform_workers
        if not _is_int(tw) or tw < 0:
            raise ValueError(f"transform_workers must be an int >= 0, got {tw!r}")
        if self.follow_shuffle_rows is not None:  # None: a resumed followed epoch keeps the pool it was saved with
            from sparkbridge.bridge.follow import check_shuffle_rows

            object.__setattr__(self, "follow_shuffle_rows",
                               check_shuffle_rows(self.follow_shuffle_rows, shuffle=self.shuffle))
        if self.follow:
            self.check_follow()

    def check_follow(self) -> None:
        """The followed epoch's settings (checked when one is followed, as before: a loader that
        never follows never reads them)."""
        if self.version is not None:
            raise UsageError("follow=True reads commits as they land; it cannot be combined with version=")
        for name in ("follow_timeout", "follow_poll"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise UsageError(f"{name} must be a positive number of seconds, got {value!r}")

    @property
    def order_algo(self) -> ShuffleAlgo:
        """The order read: ``shuffle_algo`` when given; by default ``GLOBAL`` when shuffling (a
        uniform shuffle, O(1) order memory, as fast as Mosaic's ``py1e`` in memory and faster at
        scale: README, "Order at scale") and Mosaic's ``PY1E`` partition without shuffling (shards
        read in order, whatever the dataset's size). A loader left at the default resumes a saved
        state in the order that state names (:meth:`sparkbridge.bridge.epochs.SnapshotEpochs.reset`)."""
        if self.shuffle_algo is not None:
            return ShuffleAlgo.parse(self.shuffle_algo)
        return ShuffleAlgo.GLOBAL if self.shuffle else ShuffleAlgo.PY1E

    # ------------------------------------------------------------------ views for the stages

    def dataset_options(self, *, remote: Optional[str], local: Optional[str]) -> dict[str, Any]:
        """What a snapshot's :class:`~sparkbridge.bridge.dataset.BatchDataset` is built from, but
        the version (a resumed state may rebuild it on the version a saved run read)."""
        return dict(
            remote=remote, local=local, batch_size=self.batch_size, shuffle=self.shuffle, shuffle_seed=self.seed,
            shuffle_algo=self.order_algo, shuffle_block_size=self.shuffle_block_size,
            num_canonical_nodes=self.num_canonical_nodes, partition_algo=self.partition_algo,
            cache_limit=self.cache_limit, predownload=self.predownload, download_retry=self.download_retry,
            download_timeout=self.download_timeout, validate_hash=self.validate_hash, drop_last=self.drop_last,
            decoded_cache_bytes=self.decoded_cache_bytes, columns=self.columns, features=self.features,
            label=self.label,
        )

    @property
    def follow_settings(self) -> dict[str, Any]:
        """What a followed epoch waits with."""
        return {"timeout": self.follow_timeout, "idle_timeout": self.follow_idle_timeout, "poll": self.follow_poll,
                "shuffle_rows": self.follow_shuffle_rows}

    def but(self, **changes: Any) -> "LoaderOptions":
        """A copy with ``changes``, validated again."""
        return replace(self, **changes)
