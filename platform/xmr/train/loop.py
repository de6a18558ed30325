"""The Ray Train adapter: ``train_loop_per_worker`` is ``xmr.train.fit.fit`` with Ray's hooks.

On every data-parallel worker: the device Ray assigns, the DDP world Ray Train set up,
``ray.train.report`` to persist rank 0's checkpoint (Ray keeps the best
``keep_checkpoints`` and the newest), and Ray's checkpoint record as one more candidate to
resume from. Everything else (resume, epochs, evaluation, patience, "best") is the one loop's.
"""

from __future__ import annotations

from typing import Any

import torch

from xmr.config import from_dict
from xmr.distributed import all_gather_objects
from xmr.runtime import Runtime
from xmr.train.fit import Worker, fit
from xmr.train.runfs import RunDir


class RayTrainHooks:
    """A Ray Train worker's side of the loop."""

    verbose = True

    def device(self, cfg) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def nodes(self) -> int:
        import ray

        return len(set(all_gather_objects(ray.get_runtime_context().get_node_id())))

    def restored(self):
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, w: Worker, row: dict[str, Any], directory: str | None, name: str | None) -> None:
        import ray.train

        if directory is None:
            ray.train.report(row)
        else:
            ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=name)

    def recorded(self, row: dict[str, Any]) -> None:
        pass


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    from xmr.ray.compat import quiet_ray_train

    runtime = Runtime.from_dict(payload.get("runtime"))
    quiet_ray_train(runtime.verbose)
    cfg = from_dict(payload["config"])  # checked on the driver (prepare); typed once in this process
    fit(cfg, RayTrainHooks(), run=RunDir(payload["storage_root"], payload["run_name"], cfg.data.endpoint_url),
        metric=payload["metric"], mode=payload["mode"], score_untrained=payload.get("score_untrained", True),
        runtime=runtime)
