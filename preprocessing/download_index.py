"""Download a pre-built Atlas index (Wikipedia Dec 2018) of the release into --output_directory.

    python preprocessing/download_index.py --index indices/atlas/wiki/large --output_directory ${DATA_DIR}

The index lands in ``${DATA_DIR}/{index key}/`` as the original's 128 shards, ``passages.{i}.pt`` and
``embeddings.{i}.pt``. This project loads indices in its own format: convert once with

    python preprocessing/convert_atlas_index.py ${DATA_DIR}/{index key} ${DATA_DIR}/{index key}-converted

(or pass ``--convert`` here) and give ``--load_index_path ${DATA_DIR}/{index key}-converted`` to train.py or
evaluate.py. Each index matches the retriever of the model with the same key (``models/...``).

The original bucket is closed (facebookresearch/atlas issue #25): download from a mirror or a local copy of the release
with ``--base_url URL`` or ``ATLAS_BASE_URL=URL`` (the flag wins), e.g. ``--base_url file:///mnt/atlas``.
"""

from __future__ import annotations

import argparse
import os
import sys

import download_tools

PASSAGE_FNAME = "passages.{shard}.pt"
EMBEDDING_FNAME = "embeddings.{shard}.pt"
N_SHARDS = 128
CONVERTED_SUFFIX = "-converted"
_SIZES = ("xxl", "xl", "large", "base")
_DESCRIPTION = "Precomputed index for the wiki-dec2018 corpus for the {kind} Atlas {size} model"
AVAILABLE_INDICES = {
    **{f"indices/atlas/wiki/{s}": _DESCRIPTION.format(kind="pretrained", size=s) for s in _SIZES},
    **{f"indices/atlas_nq/wiki/{s}": _DESCRIPTION.format(kind="natural-questions-finetuned", size=s) for s in _SIZES},
}


def index_files(index: str) -> list[str]:
    """Release paths of all shard files of ``index``, passages then embeddings per shard (KeyError if unknown)."""
    if index not in AVAILABLE_INDICES:
        raise KeyError(f"unknown index {index!r}; choose from {', '.join(AVAILABLE_INDICES)}")
    paths = []
    for shard in range(N_SHARDS):
        paths.append(f"{index}/{PASSAGE_FNAME.format(shard=shard)}")
        paths.append(f"{index}/{EMBEDDING_FNAME.format(shard=shard)}")
    return paths


def convert(src: str, dst: str) -> None:
    """Convert the downloaded original-format index ``src`` into this project's format at ``dst``."""
    # The converter lives in the project package; make the repository root importable when run as a script.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    from src.errors import UserError
    from src.index import import_legacy_index

    print(f"Converting {src} -> {dst}")
    try:
        import_legacy_index(src, dst)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None


def main(output_directory: str, index: str, convert_to: str | None = None, base_url: str | None = None) -> str:
    """Download every shard of ``index`` from ``base_url`` (resolved); optionally convert it to ``convert_to``.

    ``convert_to`` "" means the default path ``{index dir}-converted``; None, no conversion.
    """
    base = download_tools.ATLAS.resolve(base_url)
    for path in index_files(index):
        target = download_tools.get_download_path(output_directory, path)
        download_tools.maybe_download_file(download_tools.get_s3_path(path, base), target)
    src = download_tools.get_download_path(output_directory, index)
    dst = convert_to or src.rstrip("/") + CONVERTED_SUFFIX
    if convert_to is not None:
        if os.path.exists(dst):
            print(f"{dst} exists, not converting again")
        else:
            convert(src, dst)
        print(f"Index ready: pass --load_index_path {dst}")
    else:
        print(
            f"Downloaded the original-format index to {src}. Convert it once with\n"
            f"    python preprocessing/convert_atlas_index.py {src} {dst}\n"
            f"and then pass --load_index_path {dst}"
        )
    return dst


def build_parser() -> argparse.ArgumentParser:
    lines = [f"  {key:<28} {description}" for key, description in AVAILABLE_INDICES.items()]
    parser = argparse.ArgumentParser(
        description="Download a pre-built Atlas index.", formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--index",
        required=True,
        choices=list(AVAILABLE_INDICES),
        metavar="INDEX",
        help="index download key, one of:\n" + "\n".join(lines),
    )
    parser.add_argument(
        "--output_directory",
        type=str,
        default="./data",
        help="directory under which {index key}/ is created (default: ./data)",
    )
    parser.add_argument(
        "--convert",
        nargs="?",
        const="",
        default=None,
        metavar="DST",
        help="after downloading, convert the index to this project's format in DST\n"
        f"(default DST: {{output_directory}}/{{index key}}{CONVERTED_SUFFIX})",
    )
    example = "indices/atlas/wiki/base/" + PASSAGE_FNAME.format(shard=0)
    download_tools.add_base_url_argument(parser, download_tools.ATLAS, example)
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    main(args.output_directory, args.index, args.convert, args.base_url)
