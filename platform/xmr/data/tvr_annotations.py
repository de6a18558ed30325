"""The TVR annotation jsonl (the public release's ``tvr_*_release.jsonl``), read in one place.

One JSON object a line: ``vid_name``, ``duration`` (s), ``ts`` ([start, end] s), ``desc``,
``type`` (``v`` visual, ``t`` subtitle, ``vt`` both) and ``desc_id``; the test splits
carry no ``ts`` / ``type``. Every problem names the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FIELDS = ("vid_name", "duration", "ts", "desc", "type", "desc_id")
QUERY_TYPES = ("v", "t", "vt")


def read_tvr_jsonl(path: str | Path, required: tuple[str, ...] = FIELDS,
                   error: type[Exception] = ValueError) -> list[dict[str, Any]]:
    """The annotation lines of ``path``, each checked for the ``required`` fields (and, when
    present, a ``ts`` of two numbers and a known ``type``); raises ``error``."""
    out = []
    with open(path, encoding="utf-8") as handle:
        for ln, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{ln}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(item, dict):
                raise error(f"{where}: expected a JSON object, got {type(item).__name__}")
            missing = [k for k in required if k not in item]
            if missing:
                raise error(f"{where}: missing field(s) {missing}")
            ts = item.get("ts")
            if ts is not None and not (isinstance(ts, list) and len(ts) == 2
                                       and all(isinstance(t, (int, float)) for t in ts)):
                raise error(f"{where}: ts must be [start, end] seconds, got {ts!r}")
            if "type" in item and item["type"] not in QUERY_TYPES:
                raise error(f"{where}: type must be v, t or vt, got {item['type']!r}")
            out.append(item)
    if not out:
        raise error(f"{path}: no annotation lines")
    return out
