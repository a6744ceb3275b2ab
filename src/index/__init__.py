"""The distributed passage index: sharded exact (or faiss) search, its lifecycle, save/load, legacy import.

Modules: ``distributed_index`` (DistributedIndex: sharding and the collective search), ``flat`` (exact chunked top-k
with deterministic ties), ``faiss_index`` (optional compressed indexes), ``embed`` (embedding passages),
``refresh`` (the refresh schedule, building and refreshing the index), ``files`` (the on-disk format and its checked
reads), ``io`` (collective save and load),
``legacy`` (importing indices saved by the original Atlas).
"""

from src.index.distributed_index import DistributedIndex, LocalPassages, block_ranges
from src.index.embed import embed_passages
from src.index.io import load_index, save_index


def import_legacy_index(src_dir: str, dst_dir: str) -> None:
    """Convert an original Atlas index (passages.{i}.pt + embeddings.{i}.pt) in ``src_dir`` into ``dst_dir``."""
    # Imported here so that `python -m src.index.legacy` does not find the module already loaded by this package.
    from src.index.legacy import import_legacy_index as convert

    convert(src_dir, dst_dir)


__all__ = [
    "DistributedIndex",
    "LocalPassages",
    "block_ranges",
    "embed_passages",
    "import_legacy_index",
    "load_index",
    "save_index",
]
