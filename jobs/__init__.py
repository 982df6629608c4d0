"""Entry points: the ``sparkbridge`` console script and the spark-submit / torchrun scripts.

Each command module exposes ``add_<cmd>_arguments(parser)`` and ``run_<cmd>(args) -> int`` (see
``jobs/cli.py``) and imports pyspark/torch only inside ``run_<cmd>``, so ``sparkbridge --help``
stays instant.
"""

__all__: list[str] = []
