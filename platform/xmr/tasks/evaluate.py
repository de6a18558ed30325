"""The evaluation every caller uses (the trainer each epoch, ``xmr eval``, ``xmr compare``,
the tests): a family's metrics over a whole split, each sample scored exactly once across
the data-parallel ranks and reduced before it is reported. Ray Tune only sees worker 0's
metrics, so worker 0 must hold the metric of the whole split, not of its share; every rank
returns the same dict. In one process it is simply the split's metrics."""

from __future__ import annotations

import torch

from xmr.config import Config
from xmr.data.manifest import Manifest
from xmr.data.reader import loader_for, to_device
from xmr.distributed import all_gather_objects, all_reduce_sum, broadcast_object, world_info
from xmr.losses.registry import TermContext
from xmr.tasks import family_of


@torch.no_grad()
def evaluate(method_or_model, cfg: Config, manifest: Manifest, split: str) -> dict[str, float]:
    """The family's metrics over the whole ``split`` (plus ``validation_losses`` when given a
    Method rather than a bare model); the same dict on every rank."""
    model = getattr(method_or_model, "model", method_or_model)
    fam = family_of(cfg)
    shares = all_gather_objects(fam.score_share(model, cfg, manifest, split))
    metrics = broadcast_object(fam.score(shares, cfg) if world_info()[0] == 0 else None)
    if hasattr(method_or_model, "objective"):
        metrics.update(validation_losses(method_or_model, cfg, manifest, split))
    return metrics


@torch.no_grad()
def validation_losses(method, cfg: Config, manifest: Manifest, split: str) -> dict[str, float]:
    """``val_<term>`` for the terms that are scored on validation data (the reconstruction
    loss that MAE pre-training selects its checkpoint by): eval mode, masks drawn from a
    fixed seed so every epoch is scored on the same masks, averaged over the whole split."""
    terms = {n: t for n, t in method.objective.terms.items() if t.validation_metric}
    if not terms:
        return {}
    device = next(method.parameters()).device
    sums = torch.zeros(len(terms) + 1, dtype=torch.float64, device=device)
    rank, world = world_info()
    was_training = method.training
    method.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for batch in to_device(loader_for(cfg, split, rank=rank, world_size=world, manifest=manifest), device):
                if len(batch["index"]) == 0:
                    continue
                out = method.model(batch)
                for i, term in enumerate(terms.values()):
                    sums[i] += term.per_anchor(out, batch, TermContext()).double().sum()
                sums[-1] += len(batch["index"])
    finally:
        method.train(was_training)
    all_reduce_sum(sums)
    return {f"val_{name}": float(sums[i] / sums[-1].clamp(min=1)) for i, name in enumerate(terms)}

