"""On-disk formats shared by the Spark side and the training side: MDS shards
(:mod:`sparkbridge.format.mds`), their compression and hashes (:mod:`sparkbridge.format.codecs`),
and ``manifest.json`` (:mod:`sparkbridge.format.manifest`). numpy and the standard library only.
"""

__all__: list[str] = []
