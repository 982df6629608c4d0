"""``sparkbridge.jobs.distributor``: ``sparkbridge train`` launched by pyspark's ``TorchDistributor``
(local_mode, 2 real torchrun ranks on this machine), as a notebook cell would; the ranks read
disjoint shares that together are the whole dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sparkbridge import etl
from sparkbridge.errors import SparkbridgeError, UsageError

REPO = Path(__file__).resolve().parents[2]
ROWS = 600
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(spark, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("distributor") / "ds")
    df = spark.range(0, ROWS, numPartitions=3).selectExpr("id", "cast(id as double) / 7 AS x",
                                                          "cast(id % 3 as double) AS y")
    etl.write_mds(df, out, shard_size="4KB")  # several shards: a real split between ranks
    return out


def read_my_share(data: str, out: str) -> int:
    """Run on each rank by TorchDistributor (imported there by reference): one epoch's sample ids."""
    import torch.distributed as dist

    from sparkbridge.bridge import StreamingLoader

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    loader = StreamingLoader(data, batch_size=25, shuffle=True, num_workers=0)
    ids = [int(i) for batch in loader for i in batch["id"]]
    loader.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"ids": ids, "pid": os.getpid(),
                                                          "world": dist.get_world_size()}))
    dist.barrier()
    dist.destroy_process_group()
    return rank


def test_train_with_torch_distributor_on_two_ranks(spark, dataset, tmp_path, monkeypatch):
    from pyspark.ml.torch.distributor import TorchDistributor

    from sparkbridge.jobs.distributor import train_with_torch_distributor

    run = tmp_path / "run"
    assert train_with_torch_distributor(["--data", dataset, "--label", "y", "--features", "x,id", "--epochs", "2",
                                         "--batch-size", "50", "--out", str(run), "--no-progress"],
                                        num_processes=2, local_mode=True) == 0
    summary = json.loads((run / "summary.json").read_text())
    ranks = sorted(summary["ranks"], key=lambda r: r["rank"])
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["pid"] != ranks[1]["pid"] and os.getpid() not in {r["pid"] for r in ranks}
    assert [r["rows"] for r in ranks] == [ROWS, ROWS]  # 2 epochs of an equal half each
    assert summary["rows_this_run"] == 2 * ROWS and summary["steps_this_run"] == 2 * ROWS // 2 // 50

    # the same launcher, a reader on each rank: disjoint shares, together every row once
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    shares = tmp_path / "shares"
    shares.mkdir()
    TorchDistributor(num_processes=2, local_mode=True, use_gpu=False).run(read_my_share, dataset, str(shares))
    got = [json.loads((shares / f"rank{r}.json").read_text()) for r in (0, 1)]
    a, b = set(got[0]["ids"]), set(got[1]["ids"])
    assert len(got[0]["ids"]) == len(a) == ROWS // 2 and len(got[1]["ids"]) == len(b) == ROWS // 2
    assert not a & b and a | b == set(range(ROWS))


def test_bad_options_fail_before_any_rank_starts(spark, dataset, capfd):
    from sparkbridge.jobs.distributor import train_with_torch_distributor

    with pytest.raises(UsageError, match="unrecognized arguments: --epohcs 2"):
        train_with_torch_distributor(["--data", dataset, "--label", "y", "--epohcs", "2"])
    with pytest.raises(UsageError, match="num_processes must be an int >= 1"):
        train_with_torch_distributor(["--data", dataset, "--label", "y"], num_processes=0)
    capfd.readouterr()
    with pytest.raises(SparkbridgeError, match="TorchDistributor exited with code 1 on rank 0"):
        train_with_torch_distributor(["--data", dataset, "--label", "nope", "--no-progress"], num_processes=2)
    out = capfd.readouterr()
    assert "jobs/train.py: error:" in out.out + out.err and "'nope'" in out.out + out.err
