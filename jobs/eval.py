"""Evaluation job for ``ray job submit`` (the same code path as ``xmr eval``)::

    ray job submit --working-dir . -- python jobs/eval.py --checkpoint s3://bucket/runs/tvr1 \\
        --data s3://bucket/tvr --split val --out s3://bucket/eval/tvr1 --workers 4 --nms 0.5

Inside a submitted job ``RAY_ADDRESS`` is set, so ``--workers`` > 1 runs on the cluster.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the checkout's xmr, installed or not

from xmr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
