"""Later-epoch rows/s of ``StreamingLoader(shuffle=True)`` on ``bench/loader.py``'s dataset: the
median of N epochs, with the in-memory bound interleaved. One JSON line, for before/after runs of
two trees alternated in fresh processes (medians, unlike ``loader.py``'s best of 2, are stable
enough here to resolve a few percent).

    python bench/later_epochs.py DATA WORKERS EPOCHS

``DATA``: the ``data`` folder ``bench/loader.py --out OUT`` writes (1,000,000 rows). Run it with
each tree's interpreter; ``sparkbridge`` in the output says which tree was measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader import BATCH, bound_epoch, in_memory_table, ours_epoch  # noqa: E402


def main() -> None:
    from sparkbridge.bridge import StreamingLoader
    import sparkbridge

    data, workers, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    table = in_memory_table(data, 1_000_000)
    rng = np.random.default_rng(1)
    loader = StreamingLoader(data, batch_size=BATCH, shuffle=True, num_workers=workers)
    ours_epoch(loader)  # the first epoch fills the resident table
    ours, bound = [], []
    for _ in range(epochs):
        rows, seconds = ours_epoch(loader)
        ours.append(rows / seconds)
        rows, seconds = bound_epoch(table, rng)
        bound.append(rows / seconds)
    loader.close()
    print(json.dumps({"sparkbridge": sparkbridge.__file__, "workers": workers,
                      "rows_per_s": float(np.median(ours)), "bound_rows_per_s": float(np.median(bound)),
                      "ratio_to_bound": float(np.median(np.array(ours) / np.array(bound)))}))


if __name__ == "__main__":
    main()
