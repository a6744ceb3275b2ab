"""The distributed passage index: sharded exact (or faiss) search, refresh, save/load, legacy import.

Modules: ``distributed_index`` (DistributedIndex: sharding and the collective search), ``flat`` (exact chunked top-k
with deterministic ties), ``faiss_index`` (optional compressed indexes), ``io`` (the on-disk format), ``embed``
(the refresh: embedding passages), ``legacy`` (importing indices saved by the original Atlas).
"""

from src.index.distributed_index import DistributedIndex, LocalPassages
from src.index.embed import embed_passages


def import_legacy_index(src_dir: str, dst_dir: str) -> None:
    """Convert an original Atlas index (passages.{i}.pt + embeddings.{i}.pt) in ``src_dir`` into ``dst_dir``."""
    # Imported here so that `python -m src.index.legacy` does not find the module already loaded by this package.
    from src.index.legacy import import_legacy_index as convert

    convert(src_dir, dst_dir)


__all__ = ["DistributedIndex", "LocalPassages", "embed_passages", "import_legacy_index"]
