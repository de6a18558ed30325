"""Training job for ``ray job submit`` (the same code path as ``xmr train``)::

    ray job submit --working-dir . -- python jobs/train.py --config sccmrl --set data.path=s3://bucket/avdigits

Inside a submitted job ``RAY_ADDRESS`` is set, so the trainer attaches to the cluster;
run directly, it starts an embedded local Ray.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # the checkout's xmr, installed or not

from xmr.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
