"""Entry points: the ``sparkbridge`` console script and the spark-submit / torchrun scripts.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and imports
pyspark/torch only inside ``run``, so ``sparkbridge --help`` stays instant.
"""

__all__: list[str] = []
