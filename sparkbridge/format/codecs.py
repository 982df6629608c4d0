"""Shard compression and hashes, by Mosaic Streaming's names (``zstd``, ``zstd:7``, ``xxh64``, ...).

Codecs import on first use (a dataset written with zstd never loads brotli); the C codecs release
the GIL, so the writer and the loader compress, decompress and hash on background threads.

A zstd file may hold several frames back to back (RFC 8878 §3.1): ``zstd.decompress``, which
Mosaic uses, decodes such a file to the concatenation of the frames' contents. The writer uses that
to compress a shard piece by piece while its batches arrive (see :func:`concatenates`).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

from sparkbridge.errors import ShardFormatError

__all__ = ["compression_extension", "compress", "decompress", "concatenates", "hash_bytes", "hash_parts"]


def _split_compression(algo: str) -> tuple[str, Optional[int]]:
    family, _, level = algo.partition(":")
    return family, (int(level) if level else None)


def _zstd_codec():
    import zstd

    return (lambda d, lvl: zstd.compress(d, 3 if lvl is None else lvl)), zstd.decompress


def _gzip_codec():
    import gzip

    return (lambda d, lvl: gzip.compress(d, 9 if lvl is None else lvl)), gzip.decompress


def _bz2_codec():
    import bz2

    return (lambda d, lvl: bz2.compress(d, 9 if lvl is None else lvl)), bz2.decompress


def _brotli_codec():
    import brotli

    return (lambda d, lvl: brotli.compress(bytes(d), quality=11 if lvl is None else lvl)), \
        (lambda d: brotli.decompress(bytes(d)))


def _snappy_codec():
    import snappy

    return (lambda d, lvl: snappy.compress(bytes(d))), (lambda d: snappy.decompress(bytes(d)))


#: Mosaic's compression families → codec factory (imported on first use), with Mosaic's defaults.
_CODECS = {"zstd": _zstd_codec, "gz": _gzip_codec, "bz2": _bz2_codec, "br": _brotli_codec, "snappy": _snappy_codec}


def compression_extension(algo: str) -> str:
    """File extension of a Mosaic compression name such as ``zstd`` or ``zstd:7``."""
    family, _ = _split_compression(algo)
    if family not in _CODECS:
        raise ShardFormatError(
            f"unsupported compression {algo!r}; choose one of {sorted(_CODECS)}"
            " optionally with ':level'"
        )
    return family


def compress(algo: Optional[str], data: Union[bytes, memoryview]) -> bytes:
    """Compress as Mosaic does (zstd default level 3). The C codecs release the GIL."""
    if algo is None:
        return bytes(data)
    family = compression_extension(algo)  # validates the name
    return _CODECS[family]()[0](data, _split_compression(algo)[1])


def concatenates(algo: Optional[str]) -> bool:
    """Whether pieces compressed one by one and written back to back decompress, with Mosaic's own
    ``decompress``, to the pieces joined: true for zstd (one frame per piece). Other codecs are
    compressed in one call per shard."""
    return algo is not None and compression_extension(algo) == "zstd"


def decompress(algo: Optional[str], data: Union[bytes, memoryview]) -> bytes:
    """Inverse of :func:`compress`."""
    if algo is None:
        return bytes(data)
    return _CODECS[compression_extension(algo)]()[1](data)


def _hasher(algo: str):
    import hashlib

    import xxhash

    if algo in xxhash.algorithms_available:
        return getattr(xxhash, algo)()
    if algo in hashlib.algorithms_available and not algo.startswith("shake_"):
        return hashlib.new(algo)
    raise ShardFormatError(f"unsupported hash {algo!r}; use e.g. 'xxh64', 'xxh3_64' or 'sha1'")


def hash_bytes(algo: str, data: Union[bytes, memoryview]) -> str:
    """Hex digest by Mosaic's hash names: xxhash's (``xxh64``, ``xxh3_64``, ...) or hashlib's."""
    return hash_parts(algo, (data,))


def hash_parts(algo: str, parts: Iterable[Any]) -> str:
    """:func:`hash_bytes` of the parts joined (any contiguous buffers), without joining them."""
    h = _hasher(algo)
    for part in parts:
        h.update(part)
    return h.hexdigest()
