"""Convert an index downloaded from the original Atlas release into this project's format.

Usage: python preprocessing/convert_atlas_index.py SRC_DIR DST_DIR   (same as python -m src.index.legacy)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.index.legacy import main  # noqa: E402  (needs the repository root on sys.path first)

if __name__ == "__main__":
    sys.exit(main())
