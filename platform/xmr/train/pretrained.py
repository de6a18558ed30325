"""Initialising a fresh run's model from another run's checkpoint (mixer-MAE pre-training).

Training calls this for a fresh run only, never ``build_model``: a fine-tuned checkpoint
must rebuild without the pre-training files being present.
"""

from __future__ import annotations

from torch import nn

from xmr.checkpoint import load_checkpoint


def load_pretrained(model: nn.Module, checkpoint_dir: str) -> None:
    """Copy the ``model.*`` weights of ``checkpoint_dir`` into ``model``; every weight of
    ``model`` must be there with its shape (extra ones, e.g. decoder heads, are ignored)."""
    _, state, _ = load_checkpoint(checkpoint_dir)
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    own = model.state_dict()
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in weights.items()
                  if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(weights))
    if mismatched or missing:
        raise ValueError(f"model.pretrained = {checkpoint_dir!r} does not fit this model: "
                         f"shape mismatches {mismatched[:5]}, missing {missing[:5]}")
    model.load_state_dict({k: v for k, v in weights.items() if k in own})
