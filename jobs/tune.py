"""Sweep job for ``ray job submit`` (the same code path as ``xmr tune``)::

    ray job submit --working-dir . -- python jobs/tune.py --config qacln --space search_spaces/qacln.yaml \
        --trials 40 --storage s3://bucket/xmr-runs --name qacln-lambdas
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from xmr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
