"""Masked reconstruction (mixer-MAE pre-training): MSE on the masked tokens only.

Per sample, each modality's error is averaged over its masked tokens and features, and
the two modalities are averaged, so neither dominates by token count. It is also scored on
the validation split (``val_reconstruction``, fixed masks), which is what pre-training
selects its checkpoint by.
"""

from __future__ import annotations


from xmr.losses.registry import LossTerm, register_term


@register_term("reconstruction")
class Reconstruction(LossTerm):
    families = ("pair", "category")
    needs = frozenset({"reconstruction"})
    validation_metric = True

    def per_anchor(self, out, batch, ctx):
        r = out.reconstruction
        if r is None:
            raise ValueError("the reconstruction term needs a model that reconstructs (model.name = mixer_mae)")
        per_modality = []
        for role in ("a", "b"):
            mask = r.mask[role].unsqueeze(-1).to(r.recon[role].dtype)
            err = ((r.recon[role] - r.target[role]).pow(2) * mask).flatten(1).sum(dim=1)
            per_modality.append(err / (mask.flatten(1).sum(dim=1) * r.recon[role].shape[-1]).clamp(min=1))
        return (per_modality[0] + per_modality[1]) / 2
