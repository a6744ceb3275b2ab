"""Download a preprocessed Wikipedia corpus of the Atlas release (passage jsonl files) into --output_directory.

    python preprocessing/download_corpus.py --corpus corpora/wiki/enwiki-dec2018 --output_directory ${DATA_DIR}

Files land in ``${DATA_DIR}/{corpus key}/``: ``text-list-100-sec.jsonl`` and ``infobox.jsonl``. Pass both to
``--passages``.

The original bucket is closed (facebookresearch/atlas issue #25): download from a mirror or a local copy of the release
with ``--base_url URL`` or ``ATLAS_BASE_URL=URL`` (the flag wins), e.g. ``--base_url file:///mnt/atlas``.
"""

from __future__ import annotations

import argparse

import download_tools

CORPUS_FILES = ("text-list-100-sec.jsonl", "infobox.jsonl")
AVAILABLE_CORPORA = {
    "corpora/wiki/enwiki-dec2017": "Wikipedia dump from Dec 2017, preprocessed into passages",
    "corpora/wiki/enwiki-dec2018": "Wikipedia dump from Dec 2018, preprocessed into passages (recommended for NQ, TQA)",
    "corpora/wiki/enwiki-aug2019": "Wikipedia dump from Aug 2019, preprocessed into passages",
    "corpora/wiki/enwiki-dec2020": "Wikipedia dump from Dec 2020, preprocessed into passages",
    "corpora/wiki/enwiki-dec2021": "Wikipedia dump from Dec 2021, preprocessed into passages",
}


def corpus_files(corpus: str) -> list[str]:
    """Release paths of the files of ``corpus`` (KeyError for an unknown key)."""
    if corpus not in AVAILABLE_CORPORA:
        raise KeyError(f"unknown corpus {corpus!r}; choose from {', '.join(AVAILABLE_CORPORA)}")
    return [f"{corpus}/{name}" for name in CORPUS_FILES]


def main(output_directory: str, corpus: str, base_url: str | None = None) -> list[str]:
    """Download every file of ``corpus`` from ``base_url`` (resolved) under ``output_directory``; return the paths."""
    base, paths = download_tools.ATLAS.resolve(base_url), []
    for path in corpus_files(corpus):
        target = download_tools.get_download_path(output_directory, path)
        paths.append(download_tools.maybe_download_file(download_tools.get_s3_path(path, base), target))
    print(f"Corpus ready: pass --passages {' '.join(paths)}")
    return paths


def build_parser() -> argparse.ArgumentParser:
    lines = [f"  {key:<30} {description}" for key, description in AVAILABLE_CORPORA.items()]
    parser = argparse.ArgumentParser(
        description="Download an Atlas Wikipedia passage corpus.",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "--corpus",
        required=True,
        choices=list(AVAILABLE_CORPORA),
        metavar="CORPUS",
        help="corpus download key, one of:\n" + "\n".join(lines),
    )
    parser.add_argument(
        "--output_directory",
        type=str,
        default="./data",
        help="directory under which {corpus key}/ is created (default: ./data)",
    )
    example = f"corpora/wiki/enwiki-dec2018/{CORPUS_FILES[0]}"
    download_tools.add_base_url_argument(parser, download_tools.ATLAS, example)
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    main(args.output_directory, args.corpus, args.base_url)
