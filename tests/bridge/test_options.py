"""``LoaderOptions``: the loader's settings, frozen and validated once, with the messages users saw
from ``StreamingLoader`` before it existed (each check is reached through the public loader too)."""

from __future__ import annotations

import dataclasses

import pytest

from sparkbridge.bridge import LoaderOptions, ShuffleAlgo, StreamingLoader
from sparkbridge.errors import UsageError
from tests.bridge.util import write_numeric

N = 100


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_numeric(tmp_path_factory.mktemp("options") / "ds", N)


BAD = [
    ({"batch_size": 0}, ValueError, r"^batch_size must be a positive int, got 0$"),
    ({"batch_size": True}, ValueError, r"^batch_size must be a positive int, got True$"),
    ({"num_workers": -1}, ValueError, r"^num_workers must be an int >= 0, got -1$"),
    ({"download_retry": 0}, ValueError, r"^download_retry is the number of download attempts \(>= 1\), got 0$"),
    ({"prefetch": 0}, ValueError, r"^prefetch must be an int >= 1, got 0$"),
    ({"shuffle_algo": "fast"}, ValueError,
     r"^shuffle_algo must be one of \['py1e', 'py1br', 'py1s', 'py2s', 'naive', 'global'\], got 'fast'$"),
    ({"seed": -3}, ValueError, r"^seed must be an int >= 0, got -3$"),
    ({"validate_hash": ""}, ValueError,
     r"^validate_hash must be a hash name such as 'xxh64', True/None \(auto\) or False$"),
    ({"transform": 3}, ValueError, r"^transform must be a callable taking a batch, got int$"),
    ({"transform": len, "transform_workers": -1}, ValueError, r"^transform_workers must be an int >= 0, got -1$"),
    ({"follow": True, "version": 0}, UsageError,
     r"^follow=True reads commits as they land; it cannot be combined with version=$"),
    ({"follow": True, "follow_timeout": 0}, UsageError,
     r"^follow_timeout must be a positive number of seconds, got 0$"),
    ({"follow": True, "follow_poll": -1.0}, UsageError,
     r"^follow_poll must be a positive number of seconds, got -1.0$"),
]


@pytest.mark.parametrize("bad,cls,message", BAD, ids=[next(iter(b)) + "=" + repr(b[next(iter(b))]) for b, _, _ in BAD])
def test_each_check_names_the_option_in_the_loader_and_in_the_options(data, bad, cls, message):
    kw = {"batch_size": 8, **bad}
    with pytest.raises(cls, match=message):
        StreamingLoader(data, **kw)
    with pytest.raises(cls, match=message):
        LoaderOptions(remote_or_local=data, **kw)


def test_options_are_frozen_keyword_only_and_normalized(data):
    with pytest.raises(TypeError):
        LoaderOptions(data, batch_size=8)  # noqa: the dataset is a keyword too
    opts = LoaderOptions(remote_or_local=data, batch_size=8, validate_hash=True, num_workers=2, transform=len)
    assert opts.validate_hash is None  # True means "what the index has"
    assert opts.transform_workers == 2  # the loader's workers, with a transform
    assert LoaderOptions(remote_or_local=data, batch_size=8, num_workers=2).transform_workers == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.batch_size = 9
    with pytest.raises(ValueError, match="^batch_size must be a positive int, got 0$"):
        opts.but(batch_size=0)  # a copy is validated again


def test_loader_exposes_and_can_be_built_from_its_options(data):
    loader = StreamingLoader(data, batch_size=32, shuffle=True, seed=5)
    opts = loader.options
    assert (opts.batch_size, opts.shuffle, opts.seed, opts.shuffle_algo) == (32, True, 5, None)
    assert opts.order_algo is ShuffleAlgo.GLOBAL  # the default when shuffling
    ids = [b["id"].tolist() for b in loader]
    loader.close()
    again = StreamingLoader.from_options(opts)
    assert [b["id"].tolist() for b in again] == ids  # the same order from the same options
    assert sorted(sum(ids, [])) == list(range(N))
    again.close()


def test_a_path_to_one_of_the_datasets_files_names_the_folder(data, tmp_path):
    from sparkbridge.errors import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match=rf"index\.json is a file; pass the dataset's folder \({data}\)"):
        StreamingLoader(str(data / "index.json"), batch_size=4)
    with pytest.raises(DatasetNotFoundError, match="dataset folder .*nothing-here does not exist"):
        StreamingLoader(str(tmp_path / "nothing-here"), batch_size=4)
