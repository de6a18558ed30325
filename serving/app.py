"""Ray Serve entry point for ``serve run`` / ``serve deploy``::

    serve run serving.app:app_builder checkpoint=runs/demo gallery=data/avdigits split=test
    serve deploy serving/config.yaml

The application itself lives in the library (``xmr.serve.app``); this module only exposes
the builder at the import path Serve's config names.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # this checkout's xmr

from xmr.serve.app import build_app  # noqa: E402


def app_builder(args: dict):
    return build_app(args)
