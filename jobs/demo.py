"""The README's main command on the embedded default: local Ray, local shards, CPU.

Verifies the bundled audio-visual digits shards, trains SCCMRL on them with Ray Train (2
data-parallel workers on an in-process local Ray), prints the retrieval metric (mAP) before
and after training, and leaves a run folder whose best checkpoint the endpoint serves::

    RAY_AUTH_MODE=token python jobs/demo.py [--config sccmrl] [--workers 2] [--set optim.epochs=5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from xmr.ray.compat import use_token_auth  # noqa: E402

use_token_auth()  # before anything imports Ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="sccmrl", help="preset or YAML (default: sccmrl on data/avdigits)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--run-name", default="demo", help="run folder under runs/ (relaunching resumes it)")
    parser.add_argument("--set", action="append", default=[], metavar="A.B=VALUE")
    args = parser.parse_args(argv)

    from xmr.checkpoint import fetch_checkpoint
    from xmr.config import load_config
    from xmr.method import Method
    from xmr.data.cli import verify
    from xmr.data.manifest import load_manifest
    from xmr.runtime import Runtime
    from xmr.train.driver import run_training

    cfg = load_config(args.config, [f"resources.num_workers={args.workers}", *args.set])
    manifest = load_manifest(cfg.data.path)
    problems = verify(cfg.data.path, manifest, progress=False)
    print(f"[demo] dataset {manifest.name!r} at {cfg.data.path}: "
          + ("checksums OK" if not problems else f"checksum problems: {problems}"))
    if problems:
        return 1
    runtime = Runtime.from_env()  # the demo's settings (XMR_VERBOSE, XMR_CACHE, RAY_ADDRESS), read once
    result = run_training(cfg, run_name=args.run_name, runtime=runtime)
    before = result.history[0][result.metric]
    after = result.best["value"] if result.best else float("nan")
    method = Method.from_checkpoint(fetch_checkpoint(result.run_uri, cache_dir=runtime.cache))  # rebuilt from the checkpoint alone
    params = sum(p.numel() for p in method.parameters())
    print(f"[demo] {result.metric} before training {before:.4f} -> best after training {after:.4f} "
          f"(epoch {result.best['epoch'] if result.best else '-'})")
    print(f"[demo] best checkpoint: {result.best_checkpoint} ({params:,} parameters, loads without unpickling)")
    print(f"[demo] serve it:  xmr serve --checkpoint {result.run_uri} --gallery {cfg.data.path}")
    return 0 if after > before else 1


if __name__ == "__main__":
    sys.exit(main())
