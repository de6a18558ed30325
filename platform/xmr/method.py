"""A method = a model + the weighted sum of its loss terms (+ the memory bank it draws from).

The training step (``xmr.train.step``, in a Ray Train worker or in process) only calls
``Method(batch)`` and steps the optimiser over ``Method.trainable_parameters()``: term-owned
parameters (class centers, classifier, discriminator, critics) train and checkpoint with
the model.

With ``negatives.memory_bank`` > 0 the method keeps the bank of past key embeddings its
terms draw extra negatives from (``xmr.losses.negatives``): written after every training
step with the batch's keys (gathered across ranks, so every rank holds the same bank),
used only from step ``negatives.bank_warmup_steps`` on. With ``negatives.momentum`` m > 0
the keys come from a momentum copy of the model (MoCo, He et al. 2020): an exponential
moving average θ_k ← m·θ_k + (1 − m)·θ of the model's weights, never trained by gradient,
run in eval mode; it starts as a copy of the model at the first training step, is saved
in checkpoints (``key_model.*``) and so restored on resume, and stays identical on every
rank because DDP keeps the model's weights identical. Why: keys written by the live
encoder go stale within steps and a large bank of them collapses training (issue 11).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmr.checkpoint import CheckpointError, load_checkpoint
from xmr.checks import check
from xmr.config import Config
from xmr.data.manifest import load_manifest
from xmr.distributed import gather_rows
from xmr.losses.negatives import MemoryBank
from xmr.losses.registry import Objective, TermContext, outputs_needed
from xmr.models.registry import build_model
from xmr.tasks import family_of
from xmr.tasks.evaluate import evaluate


class Method(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg  # checked where it was built (``xmr.train.driver.prepare``, ``from_checkpoint``): not again
        self.family = family_of(cfg)
        self.model = build_model(cfg, outputs_needed(cfg))  # what the terms read; built before them (the seed's draws)
        self.objective = Objective(cfg)
        neg = cfg.negatives
        self.bank = None
        if neg.memory_bank > 0:  # its targets have the shape of one row's (class id, label path, multi-hot, pair id)
            shape, dtype = self.family.bank_targets(cfg)
            self.bank = MemoryBank(neg.memory_bank, cfg.model.embed_dim, shape, dtype)
        self.bank_warmup = neg.warmup()
        self.momentum = neg.key_momentum() if self.bank is not None else 0.0
        self.key_model = None
        if self.momentum > 0:
            self.key_model = copy.deepcopy(self.model).requires_grad_(False)
            self.register_buffer("key_model_ready", torch.zeros((), dtype=torch.bool))

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> "Method":
        """Rebuild the Method (model + loss terms + bank) from a checkpoint alone and load its weights."""
        cfg, state, _ = load_checkpoint(directory)
        method = cls(check(cfg))
        try:
            method.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{directory}: weights do not fit the model built from its config ({exc})") from None
        return method

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Training forward: ``{"loss": total, <term>: value, ...}`` (see ``Objective``)."""
        out = self.model(batch)
        bank = None
        if self.bank is not None and self.training and int(self.bank.writes) >= self.bank_warmup:
            bank = self.bank.view()
        result = self.objective(out, batch, TermContext(targets=self.family.targets(batch), bank=bank))
        if self.bank is not None and self.training:
            self._write_bank(out, batch)
        return result

    @torch.no_grad()
    def _update_key_model(self) -> None:
        if not bool(self.key_model_ready):
            self.key_model.load_state_dict(self.model.state_dict())
            self.key_model_ready.fill_(True)
            return
        for k, q in zip(self.key_model.parameters(), self.model.parameters()):
            k.mul_(self.momentum).add_(q.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def _write_bank(self, out, batch: dict[str, Any]) -> None:
        if self.key_model is not None:
            self._update_key_model()
            self.key_model.eval()
            keys_a, keys_b = self.key_model.encode("a", batch["a"]), self.key_model.encode("b", batch["b"])
        else:
            keys_a, keys_b = out.emb_a.detach(), out.emb_b.detach()
        y = self.family.targets(batch)
        if self.cfg.negatives.gather:
            keys_a, keys_b, y = gather_rows(keys_a.float()), gather_rows(keys_b.float()), gather_rows(y)
        n = keys_a.shape[0]
        modality = torch.cat([torch.zeros(n, dtype=torch.uint8), torch.ones(n, dtype=torch.uint8)])
        self.bank.enqueue(torch.cat([keys_a, keys_b]), torch.cat([y, y]), modality.to(keys_a.device))


def load_model(directory: str | Path, checked: Config | None = None) -> tuple[nn.Module, Config]:
    """The model alone (what retrieval needs) and its config, from a checkpoint: no loss
    terms, discriminator, bank or key encoder are built; only ``model.*`` weights load. The
    model is built as it trained (the outputs its terms read, a decoder among them), so
    its weights fit. ``checked``: the checkpoint's config as the caller read and checked it
    (``xmr eval``), not checked again."""
    cfg, state, _ = load_checkpoint(directory)
    cfg = checked or check(cfg)
    model = build_model(cfg, outputs_needed(cfg))
    try:
        model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: weights do not fit the model built from its config ({exc})") from None
    return model, cfg


def evaluate_checkpoint(checkpoint: str | Path, split: str | None = None) -> dict[str, float]:
    """A checkpoint's metrics on ``split`` (default its ``data.test_split``), in this process,
    by the same evaluation the trainer runs."""
    model, cfg = load_model(checkpoint)
    manifest = load_manifest(cfg.data.path, endpoint_url=cfg.data.endpoint_url)
    return evaluate(model.eval(), cfg, manifest, split or cfg.data.test_split)
