"""Comparison job for ``ray job submit`` (the same code path as ``xmr compare``)::

    ray job submit --working-dir . -- python jobs/compare.py --spec multineg_vs_triplet \
        --storage s3://bucket/xmr-compare --report docs/results.md
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from xmr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
