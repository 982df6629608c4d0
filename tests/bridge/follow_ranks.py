"""Run under torchrun (gloo, CPU) by test_follow_ddp.py: ranks follow a dataset while it is written.

    follow_ranks.py follow OUT DATASET BATCH      follow a write (the test's Spark job), one epoch
    follow_ranks.py cases OUT SEED COUNT [FIRST]  COUNT partitioned writes (from case FIRST), each followed
    follow_ranks.py error OUT KINDS               followed writes that fail (replaced,fenced,timeout,...)

Every step does what DDP does (an all_reduce), so a rank that takes a step another does not take
hangs the job: the process group's timeout is short (FOLLOW_PG_TIMEOUT, default 60 s) and each
randomized case runs under a watchdog (faulthandler) that ends the job with every thread's stack
when the case takes longer than CASE_TIMEOUT (default 60 s). Results go to OUT/rank<r>.json.
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.bridge.follow_log


def _init():
    import torch.distributed as dist

    # a fatal signal (SIGABRT from a C++ std::terminate, SIGSEGV) dumps every thread's Python stack
    faulthandler.enable(all_threads=True)

    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("FOLLOW_PG_TIMEOUT", 60))))
    return dist.get_rank(), dist.get_world_size()


def _epoch(loader, check_values: bool = True) -> dict:
    """One followed epoch: ids per step, the padding the loader reports per step, a DDP-like
    all_reduce per step."""
    import torch
    import torch.distributed as dist

    ids, pads, steps = [], [], 0
    for batch in loader:
        if check_values:
            assert (batch["x"].numpy() == batch["id"].numpy() / 4).all(), "x is not id / 4"
        ids += batch["id"].tolist()
        pads.append(int(getattr(loader, "padding", 0)))
        steps += 1
        dist.all_reduce(torch.zeros(1))
    return {"ids": ids, "pads": pads, "steps": steps}


def follow(out: str, path: str, batch: str) -> None:
    from sparkbridge.bridge import StreamingLoader

    rank, _ = _init()
    Path(out, f"ready{rank}").touch()  # the test starts its write now: the loader waits for the first commit
    loader = StreamingLoader(path, batch_size=int(batch), shuffle=True, seed=3, follow=True, follow_poll=0.05)
    result = _epoch(loader)
    result["second"] = sorted(i for b in loader for i in b["id"].tolist())  # the finished version
    loader.close()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------------------------- random cases

#: The first cases: a batch split 128 / 127 between ranks (the issue's reproduction), fewer rows
#: than ranks, no row at all, and shares one row short of and over a full step.
_FIXED = [
    {"batch": 128, "parts": [255, 255, 255]},
    {"batch": 4, "parts": [1]},
    {"batch": 4, "parts": [0, 0]},
    {"batch": 4, "parts": ["m-1", "m+1", "m"]},
    {"batch": 3, "parts": [1, "m-1"], "shuffle": True},
]


def _case(c: int, seed: int, world: int) -> dict:
    """Batch size, partition sizes around multiples of batch x world (0-row partitions and
    fewer rows than ranks too), which land before the loaders start, shuffle, drop_last."""
    rng = random.Random(seed)
    if c < len(_FIXED):
        fixed = dict(_FIXED[c])
        m = fixed["batch"] * world
        fixed["parts"] = [eval(p, {"m": m}) if isinstance(p, str) else p for p in fixed["parts"]]
        n = len(fixed["parts"])
        return {"before": 0, "shuffle": False, "drop_last": False, "compression": None, "size_limit": 1 << 16,
                "gaps": [0.05] * n, "step_sleep": 0.0, "resume_at": None, "pool": 0, **fixed}
    batch = rng.choice([1, 2, 3, 4, 5, 7, 8, 16])
    m = batch * world
    parts = []
    for _ in range(rng.randint(1, 5)):
        if rng.random() < 0.1:
            parts.append(rng.randint(0, world))  # tiny: fewer rows than ranks
        else:
            parts.append(max(0, rng.randint(0, 3) * m + rng.randint(-2, 2)))
    return {"batch": batch, "parts": parts, "before": rng.randint(0, len(parts)), "shuffle": rng.random() < 0.6,
            "drop_last": rng.random() < 0.25, "compression": rng.choice([None, "zstd"]),
            "size_limit": rng.choice([200, 1 << 16]), "gaps": [rng.uniform(0, 0.03) for _ in parts],
            "step_sleep": rng.choice([0.0, 0.0, 0.002]),
            # stop after this many steps, save the state, resume in a new loader (None: read through)
            "resume_at": rng.randint(1, 6) if rng.random() < 0.25 else None,
            # follow_shuffle_rows when shuffled (last: the fields above stay those of earlier runs)
            "pool": rng.choice([0, 0, 1, m, m + 1, sum(parts) // 5, sum(parts) // 2, sum(parts) + 7])}


def _expected_steps(total: int, world: int, batch: int, drop_last: bool) -> int:
    largest = -(-total // world)
    return largest // batch if drop_last else -(-largest // batch)


def _check(case: dict, results: list[dict], world: int) -> None:
    total = sum(case["parts"])
    batch = case["batch"]
    assert [r["empty"] for r in results] == [total == 0] * world, "only an empty write has no later epoch"
    steps = {r["steps"] for r in results}
    assert len(steps) == 1, f"ranks took {[r['steps'] for r in results]} steps"
    want = _expected_steps(total, world, batch, case["drop_last"])
    assert steps == {want}, f"{steps} steps, expected {want}"
    real = []
    for rank, r in enumerate(results):
        assert len(r["pads"]) == r["steps"]
        mine = []
        # a batch's padded rows are its last `pad` rows
        chunks = _split(r["ids"], r["steps"], batch)
        for chunk, pad in zip(chunks, r["pads"]):
            assert 0 <= pad <= len(chunk), (pad, len(chunk))
            mine += chunk[:len(chunk) - pad]
            for i in chunk[len(chunk) - pad:]:
                assert 0 <= i < total, f"padded row {i} is not a row of the dataset"
        assert all(i % world == rank for i in mine), f"rank {rank} got rows of another rank"
        real += mine
    assert len(real) == len(set(real)), "a row was read twice"
    if case["drop_last"]:
        assert set(real) <= set(range(total))
        assert len(real) >= world * batch * want - world * batch, "too many rows dropped"
    else:
        assert sorted(real) == list(range(total)), f"{total - len(set(real))} row(s) lost"


def _split(ids: list, steps: int, batch: int) -> list[list]:
    out, pos = [], 0
    for k in range(steps):
        n = min(batch, len(ids) - pos) if k == steps - 1 else batch
        out.append(ids[pos:pos + n])
        pos += n
    assert pos == len(ids), f"{len(ids)} rows in {steps} steps of {batch}"
    return out


def cases(out: str, seed: str, count: str, first: str = "0") -> None:
    import torch.distributed as dist

    from sparkbridge.bridge import StreamingLoader
    from tests.bridge.follow_log import PartitionedWrite

    rank, world = _init()
    timeout = float(os.environ.get("CASE_TIMEOUT", 60))
    done = 0
    for c in range(int(first), int(first) + int(count)):
        case = _case(c, int(seed) * 100_003 + c, world)
        root = os.path.join(out, f"case{c}")
        faulthandler.dump_traceback_later(timeout, exit=True)  # a hang ends the job loudly
        # the case each rank is in: a rank that dies (a signal, no Python traceback) is placed by it
        Path(out, f"case{rank}.txt").write_text(f"{c} {json.dumps(case)}")
        writer = None
        if rank == 0:
            w = PartitionedWrite(root, compression=case["compression"], size_limit=case["size_limit"])
            for rows in case["parts"][:case["before"]]:
                w.partition(rows)

            def land(w=w):
                for rows, gap in zip(case["parts"][case["before"]:], case["gaps"]):
                    time.sleep(gap)
                    w.partition(rows)
                w.complete()

            writer = threading.Thread(target=land)
        dist.barrier()
        def new_loader():
            # each rank passes a different pool (+ rank): rank 0's governs every rank's steps
            return StreamingLoader(root, batch_size=case["batch"], shuffle=case["shuffle"], seed=c,
                                   drop_last=case["drop_last"], follow=True, follow_poll=0.01, follow_timeout=30,
                                   follow_shuffle_rows=case["pool"] + rank if case["shuffle"] else None)

        loader = new_loader()
        assert loader._following(), "the case must test a followed epoch"
        if writer is not None:  # after rank 0 chose what to follow: the write is still open then
            writer.start()
        ids, pads, steps, empty, resumed = [], [], 0, False, False
        import torch

        from sparkbridge.errors import DatasetNotFoundError

        try:
            while True:
                for batch in loader:
                    assert (batch["x"].numpy() == batch["id"].numpy() / 4).all(), "x is not id / 4"
                    ids += batch["id"].tolist()
                    pads.append(int(getattr(loader, "padding", 0)))
                    steps += 1
                    if case["step_sleep"]:
                        time.sleep(case["step_sleep"])
                    dist.all_reduce(torch.zeros(1))
                    if steps == case["resume_at"] and not resumed:
                        break
                else:
                    break
                # a job stopped here: its checkpoint's state resumes a new loader (the write may have
                # completed meanwhile, or not)
                state = json.loads(json.dumps(loader.state_dict()))
                loader.close()
                resumed = True
                loader = new_loader()
                loader.load_state_dict(state)
        except DatasetNotFoundError:  # the write completed without a row: no later epoch to open
            empty = True
        loader.close()
        if writer is not None:
            writer.join()
        results = [None] * world
        dist.all_gather_object(results, {"ids": ids, "pads": pads, "steps": steps, "empty": empty})
        faulthandler.cancel_dump_traceback_later()
        if rank == 0:
            try:
                _check(case, results, world)
            except AssertionError as exc:
                Path(out, "failure.json").write_text(json.dumps({"case": c, "params": case, "error": str(exc),
                                                                 "results": results}))
                print(f"case {c} {case}: {exc}", file=sys.stderr, flush=True)
                os._exit(1)
        done += 1
    Path(out, f"rank{rank}.json").write_text(json.dumps({"cases": done}))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------- failures

def error(out: str, kinds: str) -> None:
    """Followed writes that fail while every rank follows them (``kinds``: comma-separated
    ``replaced``, ``fenced``, ``timeout``, ``damaged``: a shard only rank 1 reads fails its hash,
    ``nothing``: no commit ever comes); each rank records what it raised for each."""
    import torch
    import torch.distributed as dist

    from sparkbridge.bridge import StreamingLoader
    from sparkbridge.log import Draft, commit
    from tests.bridge.follow_log import PartitionedWrite

    rank, world = _init()
    report = {}
    for kind in kinds.split(","):
        root = os.path.join(out, kind)
        if rank == 0 and kind != "nothing":  # nothing: no write ever begins
            w = PartitionedWrite(root)
            # damaged: 10 + 1 rows a rank, then one more row of rank 1's in a damaged shard
            w.partition(10 * world + (1 if kind == "damaged" else 0))
        dist.barrier()
        steps, raised, loader = 0, None, None
        started = time.monotonic()
        try:
            loader = StreamingLoader(root, batch_size=4, follow=True, follow_poll=0.02,
                                     follow_timeout=2.0 if kind in ("timeout", "nothing") else 60.0)
            if rank == 0 and kind in ("replaced", "fenced", "damaged"):
                def fail(w=w, kind=kind):
                    time.sleep(0.5)
                    if kind == "replaced":
                        PartitionedWrite(root, mode="overwrite")  # an overwrite begins: the followed write is replaced
                    elif kind == "fenced":
                        read = w.reader.refresh().version
                        commit(w.storage, Draft(operation="vacuum", write_id="vacuum-test", read_version=read,
                                                fence=(w.write_id,), retained_from=0))
                    else:
                        w.partition(1, damaged=True)
                        w.complete()

                threading.Thread(target=fail).start()
            for _ in loader:
                steps += 1
                dist.all_reduce(torch.zeros(1))
        except Exception as exc:  # what every rank must see
            raised = {"type": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()[-2000:]}
        if loader is not None:
            loader.close()
        report[kind] = {"steps": steps, "raised": raised, "seconds": time.monotonic() - started}
        Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    os._exit(0)  # after failures the process group's teardown is not the point


if __name__ == "__main__":
    try:
        {"follow": follow, "cases": cases, "error": error}[sys.argv[1]](*sys.argv[2:])
    except BaseException:  # the test shows each rank's own failure (torchrun's report keeps the last lines)
        Path(sys.argv[2], f"crash{os.environ.get('RANK', '0')}.txt").write_text(traceback.format_exc())
        raise
