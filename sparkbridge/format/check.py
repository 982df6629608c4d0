"""One shard check for every reader: hashes, bounded decompression, size, sample count, offsets.

``sparkbridge validate`` (``jobs/datasets.py``) and the loader (``bridge``) both check shards
before trusting them; this is the one implementation. :func:`check_shard` returns every problem it
finds as a line naming the shard (validate lists them all; the loader raises the first), plus the
decompressed bytes when they are sound.

Why bounded decompression: a shard's stored bytes are untrusted (an object store, a cache, a
colleague's folder). A few KB of zstd can claim, or expand to, gigabytes. The index declares the
decompressed size (``raw_data.bytes``); :func:`decompress_bounded` never produces more than that
and refuses a shard whose stored bytes would, naming it. numpy and the standard library only (the
codecs import on first use).
"""

from __future__ import annotations

import bz2
import zlib
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from sparkbridge.errors import CorruptShardError, ShardFormatError
from sparkbridge.format.codecs import compression_extension, hash_bytes
from sparkbridge.format.mds import sample_offsets

__all__ = ["ShardReport", "check_shard", "decompress_bounded", "zstd_output_bound"]

Buffer = Union[bytes, bytearray, memoryview, np.ndarray]

_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_BLOCK_MAX = 128 << 10


@dataclass
class ShardReport:
    """What :func:`check_shard` found: ``problems`` (empty when the shard is sound), the
    decompressed shard (``raw``, uint8) and its sample ``offsets`` (uint32 view of the header)
    when they could be read, and how many hashes were compared."""

    raw: Optional[np.ndarray] = None
    offsets: Optional[np.ndarray] = None
    problems: list[str] = field(default_factory=list)
    hashes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_first(self) -> "ShardReport":
        """``self`` when sound, else :class:`CorruptShardError` with the first problem."""
        if self.problems:
            raise CorruptShardError(self.problems[0])
        return self


def _bytes_view(data: Buffer) -> memoryview:
    if isinstance(data, np.ndarray):
        return memoryview(data.reshape(-1).view(np.uint8))
    return memoryview(data).cast("B")


def zstd_output_bound(data: Buffer) -> int:
    """The most bytes ``data`` (zstd frames, possibly several, possibly skippable ones) can
    decompress to, read from the frame and block headers without decompressing: a frame's
    declared content size when it has one (libzstd enforces it), else the sum of its blocks'
    sizes (raw and RLE blocks say theirs, a compressed block holds at most 128 KiB).

    Raises ShardFormatError when the headers are malformed."""
    mv = _bytes_view(data)
    n = len(mv)
    pos, total = 0, 0
    while pos < n:
        if n - pos < 4:
            raise ShardFormatError("zstd data ends inside a frame header")
        magic = int.from_bytes(mv[pos:pos + 4], "little")
        if 0x184D2A50 <= magic <= 0x184D2A5F:  # skippable frame
            if n - pos < 8:
                raise ShardFormatError("zstd skippable frame is truncated")
            pos += 8 + int.from_bytes(mv[pos + 4:pos + 8], "little")
            continue
        if magic != _ZSTD_MAGIC:
            raise ShardFormatError(f"not zstd data (bad frame magic {magic:#010x} at byte {pos})")
        pos += 4
        if pos >= n:
            raise ShardFormatError("zstd frame header is truncated")
        fhd = mv[pos]
        pos += 1
        fcs_flag, single, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
        if not single:
            pos += 1  # window descriptor
        pos += (0, 1, 2, 4)[dict_flag]
        fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
        if pos + fcs_size > n:
            raise ShardFormatError("zstd frame header is truncated")
        declared = None
        if fcs_size:
            declared = int.from_bytes(mv[pos:pos + fcs_size], "little") + (256 if fcs_size == 2 else 0)
        pos += fcs_size
        blocks = 0
        while True:
            if pos + 3 > n:
                raise ShardFormatError("zstd block header is truncated")
            head = int.from_bytes(mv[pos:pos + 3], "little")
            pos += 3
            last, kind, size = head & 1, (head >> 1) & 3, head >> 3
            if kind == 0:  # raw
                pos += size
                blocks += size
            elif kind == 1:  # RLE: one byte repeated `size` times
                pos += 1
                blocks += size
            elif kind == 2:
                pos += size
                blocks += _ZSTD_BLOCK_MAX
            else:
                raise ShardFormatError("zstd block of the reserved type: the data is corrupt")
            if pos > n:
                raise ShardFormatError("zstd block is truncated")
            if last:
                break
        if checksum:
            pos += 4
        total += declared if declared is not None else blocks
    return total


def _snappy_length(data: Buffer) -> int:
    """The uncompressed length a raw snappy block declares (a varint at its start)."""
    mv = _bytes_view(data)
    value, shift = 0, 0
    for i in range(min(len(mv), 5)):
        byte = mv[i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
    raise ShardFormatError("snappy data has no valid length header")


def _stream(decompressor_factory, data: Buffer, max_size: int) -> bytes:
    """zlib-style decompression, member after member, never beyond ``max_size + 1`` bytes."""
    out: list[bytes] = []
    produced = 0
    rest = bytes(data)
    while rest:
        d = decompressor_factory()
        chunk = d.decompress(rest, max_size + 1 - produced)
        out.append(chunk)
        produced += len(chunk)
        if produced > max_size or d.unconsumed_tail:
            raise _TooLarge()
        if not d.eof:
            raise ShardFormatError("compressed data is truncated")
        rest = d.unused_data
    return b"".join(out)


class _TooLarge(Exception):
    pass


def decompress_bounded(compression: str, data: Buffer, *, max_size: int, where: str) -> bytes:
    """``data`` decompressed with Mosaic's ``compression`` (``zstd``, ``zstd:7``, ``gz``, ``bz2``,
    ``br``, ``snappy``), refusing — with :class:`CorruptShardError` naming ``where`` — data that
    would decompress to more than ``max_size`` bytes, before producing more than that."""
    family = compression_extension(compression)
    too_large = CorruptShardError(
        f"{where}: decompresses to more than the {max_size} bytes the index declares (raw_data.bytes): "
        "the file is corrupt or hostile (rewrite the dataset, or delete the cached copy)")
    try:
        if family == "zstd":
            if zstd_output_bound(data) > max_size + _ZSTD_BLOCK_MAX:
                raise too_large
            import zstd

            raw = zstd.decompress(data if isinstance(data, bytes) else bytes(_bytes_view(data)))
        elif family == "gz":
            raw = _stream(lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), data, max_size)
        elif family == "bz2":
            raw = _stream_bz2(data, max_size)
        elif family == "snappy":
            if _snappy_length(data) > max_size:
                raise too_large
            import snappy

            raw = snappy.decompress(bytes(data))
        elif family == "br":
            raw = _brotli(data, max_size)
        else:  # pragma: no cover - compression_extension knows no other
            raise ShardFormatError(f"unsupported compression {compression!r}")
    except _TooLarge:
        raise too_large from None
    if len(raw) > max_size:
        raise too_large
    return raw


def _stream_bz2(data: Buffer, max_size: int) -> bytes:
    out: list[bytes] = []
    produced = 0
    rest = bytes(data)
    while rest:
        d = bz2.BZ2Decompressor()
        chunk = d.decompress(rest, max_size + 1 - produced)
        out.append(chunk)
        produced += len(chunk)
        if produced > max_size:
            raise _TooLarge()
        if not d.eof:
            if d.needs_input:
                raise ShardFormatError("bz2 data is truncated")
            raise _TooLarge()
        rest = d.unused_data
    return b"".join(out)


def _brotli(data: Buffer, max_size: int) -> bytes:
    import brotli

    d = brotli.Decompressor()
    out = [d.process(bytes(data), output_buffer_limit=max_size + 1)]
    produced = len(out[0])
    while produced <= max_size and not d.is_finished():
        if d.can_accept_more_data():
            raise ShardFormatError("brotli data is truncated")
        chunk = d.process(b"", output_buffer_limit=max_size + 1 - produced)
        if not chunk:
            break
        out.append(chunk)
        produced += len(chunk)
    if produced > max_size:
        raise _TooLarge()
    return b"".join(out)


def _check_hashes(report: ShardReport, where: str, which: str, data: Buffer, hashes: Mapping[str, str],
                  names: Optional[Sequence[str]]) -> None:
    for algo in (sorted(hashes) if names is None else names):
        expected = hashes.get(algo)
        if expected is None:
            report.problems.append(
                f"{where}: validate_hash={algo!r} but the index only has {sorted(hashes)} for its {which} file")
            continue
        report.hashes_checked += 1
        actual = hash_bytes(algo, data)
        if actual != expected:
            report.problems.append(
                f"{where}: {algo} hash is {actual}, index says {expected} (the {which} file is corrupt: "
                "re-download or rewrite the dataset)")


def check_shard(
    stored: Buffer,
    *,
    where: str,
    compression: Optional[str],
    raw_bytes: int,
    samples: int,
    stored_hashes: Mapping[str, str],
    hash_names: Optional[Sequence[str]] = None,
    raw_hashes: Optional[Mapping[str, str]] = None,
) -> ShardReport:
    """Check one shard's stored bytes against its index entry.

    ``stored`` is the file as stored: compressed when ``compression`` is given (then decompressed,
    at most ``raw_bytes`` bytes), else the raw shard (then it must be ``raw_bytes`` long).
    ``stored_hashes`` are the index's hashes of that file; ``hash_names`` the ones to compare
    (None: every one listed; a listed name the index lacks is a problem). ``raw_hashes``, when
    given, are compared on the decompressed bytes too (every one). Then the header's sample
    offsets must be consistent and count ``samples``. Never raises for a bad shard (an unknown
    hash name does raise ShardFormatError); ``where`` starts every problem line, e.g.
    ``"shard 'a/shard.00001.mds.zstd'"``."""
    report = ShardReport()
    _check_hashes(report, where, "compressed" if compression else "shard", stored, stored_hashes, hash_names)
    if report.problems:
        return report
    if compression:
        try:
            raw = decompress_bounded(compression, stored, max_size=raw_bytes, where=where)
        except CorruptShardError as exc:
            report.problems.append(str(exc))
            return report
        except Exception as exc:  # codec errors have no common base class
            report.problems.append(f"{where}: cannot decompress with {compression}: {exc} (the file is corrupt)")
            return report
        if len(raw) != raw_bytes:
            report.problems.append(f"{where}: decompresses to {len(raw)} bytes, index says {raw_bytes}")
        buf = np.frombuffer(raw, dtype=np.uint8)
        if raw_hashes:
            for algo, expected in sorted(raw_hashes.items()):
                report.hashes_checked += 1
                if hash_bytes(algo, raw) != expected:
                    report.problems.append(f"{where}: decompressed {algo} hash differs from the index")
    else:
        buf = stored if isinstance(stored, np.ndarray) else np.frombuffer(stored, dtype=np.uint8)
        if buf.size != raw_bytes:
            report.problems.append(f"{where}: {buf.size} bytes, index says {raw_bytes} (the file is truncated or corrupt)")
    try:
        offsets = sample_offsets(buf, name=where)
    except ShardFormatError as exc:
        report.problems.append(str(exc))
        return report
    if len(offsets) - 1 != samples:
        report.problems.append(f"{where}: holds {len(offsets) - 1} samples, index says {samples} (the file is corrupt)")
    report.raw = buf
    n = len(offsets) - 1
    report.offsets = buf[4:4 + 4 * (n + 1)].view("<u4")
    return report
