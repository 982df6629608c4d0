"""``sparkbridge.bridge.permutation.IndexPermutation``: a bijection for any n, per (seed, epoch)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from sparkbridge.bridge.permutation import IndexPermutation


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 10, 31, 64, 97, 1000, 1024, 4099, 65536, 65537, 1 << 17,
                               999_983, 1 << 20])
def test_a_bijection_of_the_whole_range(n):
    perm = IndexPermutation(n, seed=11, epoch=3)
    values = perm.range(0, n)
    assert values.dtype == np.int64 and len(values) == n
    assert np.array_equal(np.sort(values), np.arange(n))
    assert np.array_equal(perm.inverse(values), np.arange(n))


def test_a_bijection_at_2_to_the_33():
    """Too many positions to list: the inverse recovers every one of 10^6 random and edge
    positions, so no two positions share a sample, and every value stays in range."""
    n = 1 << 33
    perm = IndexPermutation(n, seed=5, epoch=0)
    rng = np.random.default_rng(0)
    positions = np.concatenate([rng.integers(0, n, 1_000_000), [0, 1, n - 2, n - 1]])
    values = perm(positions)
    assert values.min() >= 0 and values.max() < n
    assert np.array_equal(perm.inverse(values), positions)
    # the inverse is itself a bijection: its values map back
    assert np.array_equal(perm(perm.inverse(positions)), positions)
    n = (1 << 33) + 12345  # not a power of two: cycle walking
    perm = IndexPermutation(n, seed=5, epoch=1)
    values = perm(positions)
    assert values.max() < n and np.array_equal(perm.inverse(values), positions)


def test_deterministic_per_seed_and_epoch_and_different_across_them():
    n = 100_000
    a = IndexPermutation(n, seed=1, epoch=0).range(0, n)
    assert np.array_equal(a, IndexPermutation(n, seed=1, epoch=0).range(0, n))
    assert np.array_equal(a, pickle.loads(pickle.dumps(IndexPermutation(n, seed=1, epoch=0))).range(0, n))
    # chunked evaluation gives the same values as one call
    chunks = [IndexPermutation(n, seed=1, epoch=0).range(s, min(n, s + 777)) for s in range(0, n, 777)]
    assert np.array_equal(a, np.concatenate(chunks))
    others = [IndexPermutation(n, seed=1, epoch=1).range(0, n), IndexPermutation(n, seed=2, epoch=0).range(0, n)]
    for b in others:
        # two independent orders agree at ~1 position (expected n * 1/n)
        assert int((a == b).sum()) <= 10


def test_positions_outside_the_range_are_refused():
    perm = IndexPermutation(10, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        perm(np.array([3, 10]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        perm(np.array([-1]))
    with pytest.raises(ValueError, match="n="):
        IndexPermutation(-1, seed=0)


@pytest.mark.parametrize("n,epochs", [(10, 5_000), (1000, 1000)])
def test_uniform_position_to_sample(n, epochs):
    """Each position takes each sample equally often over epochs: chi-square (fixed seed, so
    exact counts) within 1.3x its expectation (one degree of freedom per cell)."""
    counts = np.zeros((n, n), dtype=np.int64)
    for epoch in range(epochs):
        counts[np.arange(n), IndexPermutation(n, seed=7, epoch=epoch).range(0, n)] += 1
    assert int(counts.sum()) == n * epochs and (counts.sum(axis=0) == epochs).all()
    expected = epochs / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 / (n - 1) ** 2 < 1.3, chi2 / (n - 1) ** 2


def test_uniform_pairs_at_scale():
    """Large n (4 rounds): the samples at positions 0 and 1, in 32 buckets each, over 8,000
    epochs: every pair of buckets equally often (chi-square within 1.3x its expectation), so
    neighbouring positions are independent."""
    n, bins, epochs = (1 << 24) + 17, 32, 8_000
    counts = np.zeros((bins, bins), dtype=np.int64)
    for epoch in range(epochs):
        a, b = IndexPermutation(n, seed=3, epoch=epoch).range(0, 2) * bins // n
        counts[a, b] += 1
    expected = epochs / bins ** 2
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 / (bins * bins - 1) < 1.3, chi2 / (bins * bins - 1)


def test_displacement_matches_a_uniform_shuffle():
    """bench/shuffle.py's score: mean |position - sample| over n/3 is 1.0 for a uniform shuffle."""
    n = 1_000_000
    values = IndexPermutation(n, seed=1, epoch=0).range(0, n)
    score = float(np.abs(np.arange(n) - values).mean() / (n / 3))
    assert 0.99 < score < 1.01


# Values from main's first implementation (commit 6b393d2): a saved state of a global shuffle
# resumes at a position of this permutation, so its values may never change.
GOLDEN = [
    (10, 0, 0, [3, 8, 7, 6, 4, 9], "cdb2082945105fc1"),
    (1000, 11, 0, [978, 76, 207, 939, 477, 715], "70bc85a4d5edfbf3"),
    (65537, 3, 2, [35254, 40984, 61066, 42494, 29447, 46400], "87215980aac4a6ef"),
    (999_983, 1, 7, [642362, 841642, 204498, 117528, 464700, 142690], "3443586243b0f88f"),
    (100_000_000, 1, 0, [89224088, 39207356, 20864900, 81881126, 14767938, 30650037], "4d25af066b732f77"),
]


@pytest.mark.parametrize("n,seed,epoch,first,digest", GOLDEN)
def test_the_values_never_change(n, seed, epoch, first, digest):
    import hashlib

    values = IndexPermutation(n, seed=seed, epoch=epoch).range(0, min(n, 1 << 20))
    assert values[:6].tolist() == first
    assert hashlib.sha256(values.tobytes()).hexdigest()[:16] == digest


def test_the_values_never_change_past_2_to_the_32():
    perm = IndexPermutation((1 << 33) + 12345, seed=5, epoch=1)
    positions = np.array([0, 1, 2, 3, (1 << 33) + 12344, 1 << 32])
    assert perm(positions).tolist() == [8235374991, 7122871380, 6949051897, 8585372642, 5098564049, 3791748620]
