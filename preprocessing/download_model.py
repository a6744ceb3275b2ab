"""Download a pretrained (or NQ-finetuned) Atlas checkpoint of the release into --output_directory.

    python preprocessing/download_model.py --model models/atlas/large --output_directory ${DATA_DIR}

The checkpoint lands at ``${DATA_DIR}/{model key}/model.pth.tar``; pass ``--model_path ${DATA_DIR}/{model key}``
(with the matching ``--reader_model_type google/t5-{size}-lm-adapt``) to train.py or evaluate.py.

The original bucket is closed (facebookresearch/atlas issue #25): download from a mirror or a local copy of the release
with ``--base_url URL`` or ``ATLAS_BASE_URL=URL`` (the flag wins), e.g. ``--base_url file:///mnt/atlas``.
"""

from __future__ import annotations

import argparse
import os

import download_tools

MODEL_FILE_NAME = "model.pth.tar"
SIZES = {"base": "Base", "large": "Large", "xl": "XL", "xxl": "XXL"}
AVAILABLE_MODELS = {
    **{f"models/atlas/{size}": f"Pretrained Atlas {name} model" for size, name in SIZES.items()},
    **{
        f"models/atlas_nq/{size}": f"Atlas {name} model, finetuned on Natural Questions" for size, name in SIZES.items()
    },
}


def model_path(model: str) -> str:
    """Release path of the checkpoint of ``model`` (KeyError for an unknown key)."""
    if model not in AVAILABLE_MODELS:
        raise KeyError(f"unknown model {model!r}; choose from {', '.join(AVAILABLE_MODELS)}")
    return f"{model}/{MODEL_FILE_NAME}"


def main(output_directory: str, model: str, base_url: str | None = None) -> str:
    """Download the checkpoint of ``model`` from ``base_url`` (resolved) under ``output_directory``; return its path."""
    path = model_path(model)
    target = download_tools.get_download_path(output_directory, path)
    download_tools.maybe_download_file(download_tools.get_s3_path(path, base_url), target)
    size = model.rsplit("/", 1)[-1]
    print(f"Model ready: pass --model_path {os.path.dirname(target)} --reader_model_type google/t5-{size}-lm-adapt")
    return target


def build_parser() -> argparse.ArgumentParser:
    lines = [f"  {key:<22} {description}" for key, description in AVAILABLE_MODELS.items()]
    parser = argparse.ArgumentParser(
        description="Download an Atlas model checkpoint.", formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--model",
        required=True,
        choices=list(AVAILABLE_MODELS),
        metavar="MODEL",
        help="model download key, one of:\n" + "\n".join(lines),
    )
    parser.add_argument(
        "--output_directory",
        type=str,
        default="./data",
        help="directory under which {model key}/ is created (default: ./data)",
    )
    download_tools.add_base_url_argument(parser, download_tools.ATLAS, f"models/atlas/base/{MODEL_FILE_NAME}")
    return parser


if __name__ == "__main__":
    args = build_parser().parse_args()
    main(args.output_directory, args.model, args.base_url)
