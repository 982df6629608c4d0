"""Token sequences: padding to ``[B, L]`` and packing with ``cu_seqlens``, exact to the token, and a
packed run resumed at any block emits every token exactly once (over a real StreamingLoader)."""

from __future__ import annotations

import io
from collections import defaultdict

import numpy as np
import pytest
import torch

from sparkbridge.bridge import StreamingLoader
from sparkbridge.bridge.sequences import SequencePacker, pad_sequences
from sparkbridge.errors import StateError, UsageError

N, B = 300, 16


def tokens_of(k: int, *, empty: int = -1) -> np.ndarray:
    """Row k's token ids: a length from 1 to 97 (row ``empty`` has none), values naming row and place."""
    n = 0 if k == empty else (k * 37) % 97 + 1
    return (np.arange(n, dtype=np.int32) + k * 1000)


@pytest.fixture(scope="module")
def seq_data(tmp_path_factory):
    from streaming import MDSWriter

    out = tmp_path_factory.mktemp("seq") / "ds"
    with MDSWriter(out=str(out), columns={"id": "int64", "tokens": "ndarray:int32"}, compression="zstd",
                   hashes=["xxh64"], size_limit=4000) as w:
        for k in range(N):
            w.write({"id": np.int64(k), "tokens": tokens_of(k)})
    return out


def test_pad_sequences_values_mask_and_lengths():
    seqs = [torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([], dtype=torch.int32),
            torch.tensor([7], dtype=torch.int32)]
    out = pad_sequences(seqs, pad_value=-1)
    assert out["input_ids"].tolist() == [[1, 2, 3], [-1, -1, -1], [7, -1, -1]]
    assert out["input_ids"].dtype == torch.int32
    assert out["attention_mask"].tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    assert out["lengths"].tolist() == [3, 0, 1]
    fixed = pad_sequences(seqs, length=5)
    assert fixed["input_ids"].shape == (3, 5) and fixed["input_ids"][0].tolist() == [1, 2, 3, 0, 0]


def test_pad_sequences_overflow_is_named_or_truncated():
    seqs = [np.arange(3), np.arange(9), np.arange(2)]
    with pytest.raises(UsageError, match=r"row 1 has 9 tokens, more than length=4"):
        pad_sequences(seqs, length=4)
    cut = pad_sequences(seqs, length=4, overflow="truncate")
    assert cut["input_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 0]]
    assert cut["lengths"].tolist() == [3, 4, 2]
    with pytest.raises(UsageError, match="different dtypes"):
        pad_sequences([np.arange(2, dtype=np.int32), np.arange(2, dtype=np.int64)])
    with pytest.raises(UsageError, match="row 0 is a 2-d array"):
        pad_sequences([np.zeros((2, 2), np.int32)])
    with pytest.raises(UsageError, match="integers"):
        pad_sequences([np.zeros(2, np.float32)])


def rebuild(blocks) -> dict[int, list[int]]:
    """Each row id's tokens, put back together from the blocks' pieces (cu_seqlens and ids)."""
    rows: dict[int, list[int]] = defaultdict(list)
    for blk in blocks:
        flat = blk["input_ids"].reshape(-1).tolist()
        cu = blk["cu_seqlens"].tolist()
        pos = blk["position_ids"].reshape(-1).tolist()
        for j, rid in enumerate(blk["ids"].tolist()):
            piece = flat[cu[j]:cu[j + 1]]
            # a piece's positions continue where the row's earlier pieces stopped
            assert pos[cu[j]:cu[j + 1]] == list(range(len(rows[rid]), len(rows[rid]) + len(piece)))
            rows[rid].extend(piece)
    return rows


def test_packing_places_every_token_once_with_no_padding_but_the_last_block():
    batches = [{"id": torch.arange(i, i + 7),
                "tokens": [torch.from_numpy(tokens_of(k, empty=5)) for k in range(i, i + 7)]} for i in range(0, 70, 7)]
    packer = SequencePacker(batches, column="tokens", length=64, rows=3, id_column="id")
    blocks = list(packer)
    total = sum(tokens_of(k, empty=5).size for k in range(70))
    assert len(blocks) == -(-total // 192)
    for blk in blocks[:-1]:
        assert bool(blk["attention_mask"].all())  # zero padding waste before the last block
        assert blk["input_ids"].shape == (3, 64)
    assert int(blocks[-1]["attention_mask"].sum()) == total - 192 * (len(blocks) - 1)
    assert int(blocks[-1]["cu_seqlens"][-1]) == int(blocks[-1]["attention_mask"].sum())
    rows = rebuild(blocks)
    assert sorted(rows) == [k for k in range(70) if k != 5]  # the empty row has no token to place
    for k, toks in rows.items():
        assert toks == tokens_of(k).tolist()
    assert sum(b["rows_completed"] for b in blocks) == 69
    assert all(b["max_seqlen"] == int(torch.diff(b["cu_seqlens"]).max()) for b in blocks)
    # a second pass over a re-iterable source packs the same blocks again
    again = list(packer)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(blocks, again))


def test_packer_checks_its_options_and_columns():
    with pytest.raises(UsageError, match="length must be an int >= 1"):
        SequencePacker([], column="tokens", length=0)
    with pytest.raises(UsageError, match="has no column 'tokens'"):
        list(SequencePacker([{"x": [np.arange(3)]}], column="tokens", length=4))


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what a training checkpoint does with it


@pytest.mark.parametrize("stop_after", [1, 4, 9, 10])
def test_packed_loader_resumes_exactly_at_any_block(seq_data, stop_after):
    def make():
        loader = StreamingLoader(seq_data, batch_size=B, shuffle=True, seed=5)
        return SequencePacker(loader, column="tokens", length=128, rows=2, id_column="id")

    reference = list(make())
    first = make()
    head = []
    for blk in first:
        head.append(blk)
        if len(head) == stop_after:
            break
    state = _roundtrip(first.state_dict())
    resumed = make()
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(reference)
    for a, b in zip(head + tail, reference):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["cu_seqlens"], b["cu_seqlens"])
    rows = rebuild(head + tail)
    assert sorted(rows) == list(range(N))
    assert all(rows[k] == tokens_of(k).tolist() for k in rows)
    # the next pass of the resumed packer is the loader's next epoch, whole
    assert sorted(rebuild(list(resumed))) == sorted(rows)


def test_packer_state_from_other_settings_is_refused(seq_data):
    loader = StreamingLoader(seq_data, batch_size=B)
    packer = SequencePacker(loader, column="tokens", length=128, rows=2)
    state = packer.state_dict()
    other = SequencePacker(StreamingLoader(seq_data, batch_size=B), column="tokens", length=64, rows=2)
    with pytest.raises(StateError, match="length=128"):
        other.load_state_dict(state)
    with pytest.raises(StateError, match="not a SequencePacker state"):
        other.load_state_dict(loader.state_dict())


def test_pad_and_pack_read_a_ragged_column_as_values_and_offsets(seq_data):
    from sparkbridge.bridge.varwidth import Ragged

    seqs = Ragged(torch.tensor([1, 2, 3, 7, 8, 9, 10], dtype=torch.int32), torch.tensor([0, 3, 3, 4, 7]))
    out = pad_sequences(seqs, pad_value=-1)
    assert out["input_ids"].tolist() == [[1, 2, 3], [-1, -1, -1], [7, -1, -1], [8, 9, 10]]
    assert out["input_ids"].dtype == torch.int32 and out["lengths"].tolist() == [3, 0, 1, 3]
    cut = pad_sequences(seqs, length=2, overflow="truncate")
    assert cut["input_ids"].tolist() == [[1, 2], [0, 0], [7, 0], [8, 9]]
    with pytest.raises(UsageError, match=r"row 0 has 3 tokens, more than length=2"):
        pad_sequences(seqs, length=2)
    # the loader's token column is a Ragged: a packed epoch holds every token once, in order
    loader = StreamingLoader(seq_data, batch_size=B)
    assert isinstance(next(iter(loader))["tokens"], Ragged)
    blocks = list(SequencePacker(loader, column="tokens", length=50, rows=2))
    flat = torch.cat([b["input_ids"].reshape(-1)[:int(b["cu_seqlens"][-1])] for b in blocks])
    assert flat.tolist() == np.concatenate([tokens_of(k) for k in range(N)]).tolist()
    assert all(int(b["attention_mask"].sum()) == 100 for b in blocks[:-1])  # no padding but the last block's
    loader.close()
