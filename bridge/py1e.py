"""Mosaic's ``py1e`` shuffle (its default), the same order computed with less Python per shard.

Why: every epoch's order of a dataset of many small shards waits on Mosaic's
``streaming.base.shuffle.py1e.get_shuffle_py1e``, a Python loop over every shard with numpy
scalars in its arithmetic: 1.1 s at 100,000 shards, most of the first batch of a loader
(``bench/metadata.py``). This is that function step by step, with the same random draws in the
same order (each shard's shuffle, block size and shifts are drawn as Mosaic draws them, so the
ids are exactly Mosaic's: ``tests/bridge/test_mosaic_adapter.py`` compares them), with Python
ints for the bookkeeping, every shard's ids laid out in one array and shuffled in place, and the
shifts added once per canonical node. :mod:`sparkbridge.bridge.mosaic` installs it in Mosaic's
table of shuffles.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = ["get_shuffle_py1e"]


def get_shuffle_py1e(shard_sizes: Any, num_canonical_nodes: int, seed: int, epoch: int,
                     block_size: int = 1 << 18) -> np.ndarray:
    """Mosaic's ``get_shuffle_py1e`` (same arguments, same result, same warning)."""
    from streaming.base.shuffle.py1s import divide_spans

    sizes = np.asarray(shard_sizes, dtype=np.int64)
    ends = np.cumsum(sizes)
    spans = list(zip((ends - sizes).tolist(), ends.tolist()))
    num_samples = int(ends[-1]) if len(sizes) else 0

    # the order of the shards over the run, then the spans of each canonical node (as Mosaic's)
    np.random.default_rng(seed).shuffle(spans)
    spans, super_spans = divide_spans(spans, num_samples, num_canonical_nodes)

    epoch_rng = np.random.default_rng(seed + epoch)
    shuffle, integers, uniform = epoch_rng.shuffle, epoch_rng.integers, epoch_rng.uniform
    for begin, end in super_spans:
        part = spans[begin:end]
        shuffle(part)
        spans[begin:end] = part

    ids = np.empty(num_samples, np.int64)
    offset = 0
    warn_user = False
    low_block, high_block = int(0.75 * block_size), int(1.25 * block_size)
    for cn_begin, cn_end in super_spans:
        cn_spans = spans[cn_begin:cn_end]
        lengths = [end - begin for begin, end in cn_spans]
        num_cn_samples = sum(lengths)
        if num_cn_samples == 0.0:
            raise ValueError(f'The number of samples assigned to a canonical node is 0. This ' +
                             f'very likely indicates that the number of samples in this stream ' +
                             f'is less than the number of canonical nodes, which is ' +
                             f'{num_canonical_nodes}. Please check your index.json file and ' +
                             f'ensure that your dataset has been written out correctly. ' +
                             f'If this was intended, reduce num_canonical_nodes.')
        # every span's sample ids, in span order, each span shuffled in place (Mosaic shuffles an
        # arange of the span: a draw per element but the first, whatever the values)
        lens = np.array(lengths, dtype=np.int64)
        firsts = np.array([begin for begin, _ in cn_spans], dtype=np.int64)
        cn_samples = np.arange(num_cn_samples, dtype=np.int64) + np.repeat(firsts - (np.cumsum(lens) - lens), lens)
        at = 0
        for span_size in lengths:
            shuffle(cn_samples[at:at + span_size])
            at += span_size

        # each span's samples shifted by a uniform draw within a random block size around it
        shifts = []
        cn_sample_offset = 0
        for span_size in lengths:
            rand_block_size = integers(low_block, high_block)
            cutoff = (rand_block_size - span_size) / 2
            if cutoff < 0:
                cutoff = 0
                warn_user = True
            lower_bound = max(-cutoff, -cn_sample_offset)
            upper_bound = min(cutoff, num_cn_samples - cn_sample_offset - span_size)
            shifts.append(uniform(low=lower_bound, high=upper_bound, size=span_size))
            cn_sample_offset += span_size
        sample_positions = np.arange(num_cn_samples).astype(np.float64)
        if shifts:
            sample_positions += np.concatenate(shifts)

        # (Mosaic's holds the ids as float64: exact below 2^53, as its cast back)
        ids[offset:offset + num_cn_samples] = cn_samples[np.argsort(sample_positions)]
        offset += num_cn_samples

    if warn_user:
        warnings.warn('Shuffle block size was smaller than shard size for some shards. This \
                        will result in these shards not being shuffled with other shards. Set \
                        shuffle_block_size to a larger value for a higher quality shuffle.')

    return ids
