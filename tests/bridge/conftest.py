"""Release the shared memory of stock ``StreamingDataset`` objects after each test.

Mosaic keeps every segment (one file descriptor each) until interpreter exit and every new dataset
re-opens those of the live ones, so a long test session would run out of descriptors."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _release_stock_datasets(monkeypatch):
    import streaming

    from bridge.distributed import release_shared_memory

    made = []
    original = streaming.StreamingDataset.__init__

    def tracking_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(streaming.StreamingDataset, "__init__", tracking_init)
    yield
    for ds in made:
        release_shared_memory(ds)
