"""The versioned dataset log: ``_log/<version>.json`` entries, created put-if-absent, are the only
commit point of a dataset (as Delta Lake's ``_delta_log``).

* :mod:`~sparkbridge.log.entry` — one entry and its file name;
* :mod:`~sparkbridge.log.snapshot` — a version, replayed (:class:`Snapshot`, :class:`LogReader`,
  :func:`open_dataset`);
* :mod:`~sparkbridge.log.commit` — optimistic commits with conflict detection;
* :mod:`~sparkbridge.log.derived` — ``index.json``/``manifest.json`` for stock Mosaic readers;
* :mod:`~sparkbridge.log.vacuum` — deleting what no retained version references;
* :mod:`~sparkbridge.log.layout` — where files live inside a dataset root.

Standard library only (plus boto3 for S3 roots, on first use): both sides import it.
"""

from sparkbridge.log.commit import Draft, Superseded, commit
from sparkbridge.log.derived import sync_derived
from sparkbridge.log.entry import LogEntry
from sparkbridge.log.snapshot import LogReader, Snapshot, open_dataset
from sparkbridge.log.vacuum import VacuumPlan, plan_vacuum, vacuum

__all__ = ["Draft", "Superseded", "commit", "sync_derived", "LogEntry", "LogReader", "Snapshot", "open_dataset",
           "VacuumPlan", "plan_vacuum", "vacuum"]
