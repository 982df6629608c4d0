"""The dataset log against a plain reference model (Hypothesis stateful testing).

Random interleavings of what writers, vacuums and readers do to one dataset root — a whole write
(create / append / overwrite), a job write started now and committed later, a partitioned write
begun, its partitions committed one by one (a failed attempt now and then), completed, aborted or
crashed (the driver dies: no abort), resumed by another driver (two drivers on one write, as two
Spark applications), vacuums with retention 0 and a large one, readers pinning a version and
releasing it — run against the REAL log on a real root through ``write_mds``'s own commit path
(:mod:`tests.log.writes`: WriteJob, run_task writing real MDS shards, commit_partition).

After every step the root is checked against the model, which knows only what the README
promises: the version a default reader is served (the newest version with no partitioned write
open), the ids of its rows (read back from the shard files: none lost, none doubled), the latest
version, and that every pinned version still reads back exactly until released.

Runs: ``make test`` runs a bounded number of examples; ``make model-test`` runs
``SPARKBRIDGE_MODEL_EXAMPLES`` (default 10,000) with the ``long`` profile; the SeaweedFS run is
shorter (``-m slow``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, invariant, multiple, precondition, rule,
                                 run_state_machine_as_test)

from sparkbridge.errors import CommitConflictError, DatasetExistsError
from sparkbridge.etl.task import TaskFailure
from sparkbridge.log import LogReader, Superseded, vacuum
from sparkbridge.storage import open_storage
from tests.log.writes import Write, read_ids

EXAMPLES = int(os.environ.get("SPARKBRIDGE_MODEL_EXAMPLES", "0") or 0)
NO_LOADER = os.environ.get("SPARKBRIDGE_MODEL_NO_LOADER") == "1"
settings.register_profile("bounded", max_examples=25, stateful_step_count=20, deadline=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("long", max_examples=EXAMPLES or 10_000, stateful_step_count=15, deadline=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("s3", max_examples=6, stateful_step_count=15, deadline=None,
                          suppress_health_check=list(HealthCheck))

LARGE_RETENTION = 3600.0


@dataclass
class Plan:
    """One write's input: the ids of each partition (a resumed run writes the same input)."""

    write_id: str
    mode: str
    parts: list[list[int]]


@dataclass
class Version:
    """The model's view of one version: the rows a reader of it gets, and which partitioned writes
    are open at it; ``by``/``changes``/``replaces`` feed the conflict rules."""

    ids: tuple[int, ...]
    open: frozenset
    by: str = ""
    changes: bool = False
    replaces: bool = False


@dataclass(eq=False)
class Driver:
    """A live ``write_mds`` call: its Write, the plan, and (job writes) the version it read."""

    write: Write
    plan: Plan
    commit: str
    base: int
    done: set = field(default_factory=set)  # partitions this driver committed or saw claimed
    fenced: bool = False

    @property
    def write_id(self) -> str:
        return self.write.job.write_id


class LogModel(RuleBasedStateMachine):
    """See the module doc. ``make_storage`` gives each example a fresh root."""

    drivers = Bundle("drivers")
    pins = Bundle("pins")
    # seconds a retention-0 vacuum waits first, so that every file is strictly older than the
    # store's "now": file times are coarse (a kernel tick locally, whole seconds on S3), and a file
    # as old as "now" is rightly kept
    clock_resolution = 0.03

    def __init__(self) -> None:
        super().__init__()
        self.storage, self._cleanup = self.make_storage()
        self.versions: list[Version] = []
        self.states: dict[str, str] = {}  # partitioned write id -> open | complete | replaced | fenced
        self.plans: dict[str, Plan] = {}
        self.claimed: dict[str, set] = {}  # partitioned write id -> partitions committed
        self.staging_alive: dict[str, bool] = {}
        self.live: list[Driver] = []
        self.held: list[tuple[int, object, tuple]] = []  # (version, snapshot, ids)
        self.retained_from = 0
        self.next_id = 0
        self.loader_read = False
        self.removed: dict[str, tuple] = {}  # partitioned overwrite -> the rows its begin removed
        self.schema_set = False  # every write here has the same schema: only "is there one" matters
        self.introduced: set = set()  # open overwrites begun on a dataset without a schema

    # ------------------------------------------------------------------ storage

    @classmethod
    def make_storage(cls):
        folder = tempfile.mkdtemp(prefix="sparkbridge-model-")
        return open_storage(os.path.join(folder, "ds")), lambda: shutil.rmtree(folder, ignore_errors=True)

    def teardown(self) -> None:
        for d in self.live:
            d.write.crash()
        self._cleanup()
        progress = os.environ.get("SPARKBRIDGE_MODEL_PROGRESS")
        if progress:  # one line per interleaving run (a long run's count survives a timeout)
            with open(progress, "a") as f:
                f.write(f"{len(self.versions)}\n")

    # ------------------------------------------------------------------ the model

    @property
    def latest(self) -> int:
        return len(self.versions) - 1

    def ids_now(self) -> tuple[int, ...]:
        return self.versions[-1].ids if self.versions else ()

    def open_now(self) -> frozenset:
        return frozenset(w for w, s in self.states.items() if s == "open")

    def push(self, ids, *, by: str = "", changes: bool = False, replaces: bool = False) -> None:
        self.versions.append(Version(tuple(ids), self.open_now(), by, changes, replaces))

    def served(self) -> Optional[int]:
        """The newest version at which no partitioned write is open (a non-following reader and
        index.json show a partitioned write only once it is complete)."""
        for v in range(self.latest, -1, -1):
            if not self.versions[v].open:
                return v
        return None

    def plan(self, mode: str, sizes: list[int], write_id: str) -> Plan:
        parts = []
        for n in sizes:
            parts.append(list(range(self.next_id, self.next_id + n)))
            self.next_id += n
        return Plan(write_id, mode, parts)

    def catch_up_vacuum(self) -> None:
        """A vacuum commits 0 or 1 entry: the model takes the log's word for how many."""
        latest = LogReader(self.storage).refresh().version
        while self.latest < latest:
            self.push(self.ids_now())

    def open_schema(self) -> bool:
        """An append (or create) is refused while an open overwrite introduced the schema it would
        commit on (the check ``no-data-on-an-open-schema``: a fence would roll that schema back)."""
        return any(self.states[w] == "open" for w in self.introduced)

    def replace_open_writes(self, by: str) -> None:
        for w, s in self.states.items():
            if s == "open" and w != by:
                self.states[w] = "replaced"

    # ------------------------------------------------------------------ whole writes

    @rule(mode=st.sampled_from(["append", "overwrite", "error"]), sizes=st.lists(st.integers(1, 4), min_size=1,
                                                                                  max_size=3))
    def job_write(self, mode, sizes):
        if mode == "error" and self.latest >= 0:
            with pytest.raises(DatasetExistsError):
                Write(self.storage, mode)
            return
        w = Write(self.storage, mode)
        plan = self.plan(mode, sizes, w.job.write_id)
        try:
            for p, ids in enumerate(plan.parts):
                w.task(p, ids)
        except BaseException as exc:
            w.abort(exc)
            raise
        if mode != "overwrite" and self.open_schema():
            with pytest.raises(CommitConflictError, match="set the schema"):
                w.finish(partitions=len(plan.parts))
            return
        w.finish(partitions=len(plan.parts))
        self.schema_set = True
        new = [i for part in plan.parts for i in part]
        if mode == "overwrite":
            self.replace_open_writes(w.job.write_id)
            self.push(new, by=w.job.write_id, changes=True, replaces=True)
        else:
            self.push(list(self.ids_now()) + new, by=w.job.write_id, changes=True)

    @rule(target=drivers, mode=st.sampled_from(["append", "overwrite"]),
          sizes=st.lists(st.integers(1, 3), min_size=1, max_size=2))
    def start_job_write(self, mode, sizes):
        """A job write whose tasks are done; it commits in a later step (others may land first)."""
        w = Write(self.storage, mode)
        plan = self.plan(mode, sizes, w.job.write_id)
        for p, ids in enumerate(plan.parts):
            w.task(p, ids)
        d = Driver(w, plan, "job", self.latest)
        self.live.append(d)
        return d

    @rule(d=consumes(drivers))
    def finish_job_write(self, d):
        if d.commit != "job" or d not in self.live:
            return
        self.live.remove(d)
        since = self.versions[d.base + 1:]
        if d.plan.mode == "overwrite":
            conflict = any(v.changes and v.by != d.write_id for v in since)
        else:
            conflict = any(v.replaces for v in since)
        if conflict or d.fenced or (d.plan.mode != "overwrite" and self.open_schema()):
            with pytest.raises(CommitConflictError):
                d.write.finish(partitions=len(d.plan.parts))
            return
        d.write.finish(partitions=len(d.plan.parts))
        self.schema_set = True
        new = [i for part in d.plan.parts for i in part]
        if d.plan.mode == "overwrite":
            self.replace_open_writes(d.write_id)
            self.push(new, by=d.write_id, changes=True, replaces=True)
        else:
            self.push(list(self.ids_now()) + new, by=d.write_id, changes=True)

    # ------------------------------------------------------------------ partitioned writes

    @rule(target=drivers, mode=st.sampled_from(["append", "overwrite"]),
          sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3))
    def begin(self, mode, sizes):
        if mode != "overwrite" and self.open_schema():
            with pytest.raises(CommitConflictError, match="set the schema"):
                Write(self.storage, mode, commit="partition")
            return multiple()
        w = Write(self.storage, mode, commit="partition")
        plan = self.plan(mode, sizes, w.job.write_id)
        self.plans[plan.write_id] = plan
        self.claimed[plan.write_id] = set()
        self.staging_alive[plan.write_id] = True
        if mode == "overwrite":
            self.replace_open_writes(plan.write_id)
        self.states[plan.write_id] = "open"
        self.removed[plan.write_id] = self.ids_now() if mode == "overwrite" else ()
        if mode == "overwrite" and not self.schema_set:
            self.introduced.add(plan.write_id)
        self.schema_set = True
        self.push([] if mode == "overwrite" else self.ids_now(), by=plan.write_id, changes=mode == "overwrite",
                  replaces=mode == "overwrite")
        d = Driver(w, plan, "partition", self.latest)
        self.live.append(d)
        return d

    @rule(d=drivers, data=st.data(), fail_first=st.booleans())
    def commit_partition(self, d, data, fail_first):
        if d.commit != "partition" or d not in self.live:
            return
        todo = [p for p in range(len(d.plan.parts)) if p not in d.done]
        if not todo:
            return
        p = data.draw(st.sampled_from(todo))
        wid = d.write_id
        if not self.staging_alive[wid]:  # another driver of this write finished or aborted: no staging
            with pytest.raises(TaskFailure):
                d.write.write_shards(p, d.plan.parts[p])
            d.write.abort()
            self.live.remove(d)
            return
        if fail_first:  # a failed attempt: shards written, never committed (a later vacuum removes them)
            d.write.write_shards(p, d.plan.parts[p])
        row = d.write.write_shards(p, d.plan.parts[p])
        state = self.states[wid]
        if state in ("replaced", "fenced") and p in self.claimed[wid]:
            # claimed before the write ended: superseded (partition-claimed) or refused, either way
            # nothing is added
            try:
                got = d.write.commit_task(row)
            except CommitConflictError:
                got = {"superseded": True}
            assert got.get("superseded") is True, (wid, p, state)
            d.write.abort()
            self.live.remove(d)
            self.staging_alive[wid] = False
            return
        if state in ("replaced", "fenced"):
            with pytest.raises(CommitConflictError):
                d.write.commit_task(row)
            d.write.abort()
            self.live.remove(d)
            self.staging_alive[wid] = False
            return
        got = d.write.commit_task(row)
        d.done.add(p)
        if state == "complete" or p in self.claimed[wid]:
            assert got.get("superseded") is True, (wid, p, state)
            return
        assert not got.get("superseded"), (wid, p)
        self.claimed[wid].add(p)
        self.push(list(self.ids_now()) + d.plan.parts[p], by=wid, changes=True)

    @precondition(lambda self: any(d.commit == "partition" for d in self.live))
    @rule(data=st.data())
    def complete(self, data):
        candidates = [d for d in self.live if d.commit == "partition"
                      and self.claimed[d.write_id] >= set(range(len(d.plan.parts)))]
        if not candidates:
            return
        d = data.draw(st.sampled_from(candidates))
        wid = d.write_id
        self.live.remove(d)
        state = self.states[wid]
        if state in ("replaced", "fenced"):
            with pytest.raises(CommitConflictError):
                d.write.finish(partitions=len(d.plan.parts))
        elif state == "complete":
            with pytest.raises(Superseded):
                d.write.finish(partitions=len(d.plan.parts))
        else:
            d.write.finish(partitions=len(d.plan.parts))
            self.states[wid] = "complete"
            self.push(self.ids_now(), by=wid)
        self.staging_alive[wid] = False

    @rule(d=consumes(drivers))
    def abort(self, d):
        if d not in self.live:
            return
        self.live.remove(d)
        d.write.abort()
        if d.commit == "partition":
            self.staging_alive[d.write_id] = False

    @rule(d=consumes(drivers))
    def crash(self, d):
        if d not in self.live:
            return
        self.live.remove(d)
        d.write.crash()

    @precondition(lambda self: any(s == "open" for s in self.states.values()))
    @rule(target=drivers, data=st.data())
    def resume(self, data):
        """Another driver (a rerun, a second application) resumes an open write, named by its id."""
        # by begin order, not by id: ids begun in one second sort at random, which a replay would not repeat
        wid = data.draw(st.sampled_from([w for w, s in self.states.items() if s == "open"]))
        plan = self.plans[wid]
        w = Write(self.storage, plan.mode, commit="partition", resume=wid)
        assert w.job.write_id == wid
        self.staging_alive[wid] = True
        d = Driver(w, plan, "partition", self.latest)
        self.live.append(d)
        return d

    # ------------------------------------------------------------------ vacuum

    def staging_goes_with_the_files(self) -> None:
        """A vacuum deletes the files of a write that can no longer commit (replaced, fenced,
        complete), its staging included: a driver still running it fails its next task."""
        for w, s in self.states.items():
            if s != "open":
                self.staging_alive[w] = False

    @precondition(lambda self: self.latest >= 0)
    @rule()
    def vacuum_large(self):
        vacuum(self.storage, retention_seconds=LARGE_RETENTION)
        self.staging_goes_with_the_files()
        self.catch_up_vacuum()

    # Retention 0 runs only while no pin is held (keeping a pinned version past the retention is
    # not promised). Every open partitioned write is then idle past the retention: fenced, and
    # rolled back in the log (its partitions leave, an overwrite's removed rows come back).
    @precondition(lambda self: self.latest >= 0 and not self.held)
    @rule()
    def vacuum_zero(self):
        import time

        time.sleep(self.clock_resolution)
        before, served_before = self.latest, self.served()
        fenced = sorted(self.open_now())
        vacuum(self.storage, retention_seconds=0)
        for d in self.live:  # a job write's files idle past retention 0: fenced, its commit refused
            if d.commit == "job":
                d.fenced = True
        ids = list(self.ids_now())
        for w in fenced:
            gone = {i for p in self.claimed[w] for i in self.plans[w].parts[p]}
            ids = [i for i in ids if i not in gone] + list(self.removed[w])
            self.states[w] = "fenced"
        self.staging_goes_with_the_files()
        if fenced:  # the rollback restores the schema as it was (the log's word: None or the one schema)
            self.schema_set = LogReader(self.storage).refresh().schema is not None
            self.push(ids, by="vacuum", changes=True)
        self.catch_up_vacuum()
        window = min(before, served_before) if served_before is not None else before
        self.retained_from = max(window, self.retained_from)
        assert LogReader(self.storage).refresh().retained_from == self.retained_from

    # ------------------------------------------------------------------ readers

    @precondition(lambda self: self.latest >= 0)
    @rule(target=pins, data=st.data())
    def pin(self, data):
        v = data.draw(st.integers(self.retained_from, self.latest))
        snap = LogReader(self.storage).snapshot(v)
        self.held.append((v, snap, self.versions[v].ids))
        return (v, snap)

    @rule(p=consumes(pins))
    def release(self, p):
        self.held = [h for h in self.held if h[1] is not p[1]]

    # SPARKBRIDGE_MODEL_NO_LOADER=1 for long runs in several processes at once: Mosaic names its
    # shared memory by the first free prefix, and loaders of processes started together collide
    # ('/000000_locals' exists) — an artefact of running the model in parallel, not of the log
    @precondition(lambda self: self.served() is not None and not self.loader_read and not NO_LOADER)
    @rule()
    def read_with_loader(self):
        """The default StreamingLoader serves the model's version, every row once (at most once
        per interleaving: a loader costs more than the rest of a step)."""
        from sparkbridge.bridge import StreamingLoader

        self.loader_read = True

        if not self.versions[self.served()].ids:
            from sparkbridge.errors import DatasetNotFoundError

            with pytest.raises(DatasetNotFoundError, match="no rows"):
                StreamingLoader(self.storage.root, batch_size=7)
            return
        cache = tempfile.mkdtemp(prefix="sparkbridge-model-cache-")
        try:
            loader = StreamingLoader(self.storage.root, local=cache, batch_size=7, shuffle=False)
            got = sorted(int(i) for batch in loader for i in batch["id"].tolist())
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        assert got == sorted(self.versions[self.served()].ids)

    # ------------------------------------------------------------------ after every step

    @invariant()
    def the_log_matches_the_model(self):
        reader = LogReader(self.storage)
        latest = reader.refresh()
        assert latest.version == self.latest
        served = self.served()
        assert reader.complete_version() == served
        if served is not None:
            snap = reader.snapshot(served)
            assert sorted(read_ids(self.storage, snap)) == sorted(self.versions[served].ids)
        for v, snap, ids in self.held:
            assert sorted(read_ids(self.storage, snap)) == sorted(ids), f"pinned version {v}"


def _run(machine, profile: str) -> None:
    run_state_machine_as_test(machine, settings=settings.get_profile(profile))


def test_the_log_against_the_model():
    _run(LogModel, "long" if EXAMPLES else "bounded")


@pytest.mark.slow
def test_the_log_against_the_model_on_s3(s3_bucket):
    counter = iter(range(10 ** 6))

    class OnS3(LogModel):
        clock_resolution = 1.1

        @classmethod
        def make_storage(cls):
            return open_storage(s3_bucket.url(f"model-{next(counter)}")), lambda: None

    _run(OnS3, "s3")
