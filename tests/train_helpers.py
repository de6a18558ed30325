"""A plain single-process loop for the "each preset learns" tests (no Ray)."""

import itertools

import torch

from xmr.config import load_config, resolve
from xmr.data.reader import make_loader
from xmr.method import Method


def preset_cfg(name, data_path, *overrides):
    cfg = load_config(name, [f"data.path={data_path}", *overrides])
    cfg, _ = resolve(cfg)
    return cfg


def batches(cfg, split, epochs=1, shuffle=True, unit=None):
    for epoch in range(epochs):
        loader = make_loader(cfg.data.path, split, local_batch_size=cfg.data.batch_size if shuffle else 256,
                             seed=cfg.seed, epoch=epoch, shuffle=shuffle, unit=unit)
        yield from loader


def train(method: Method, cfg, steps: int, lr: float | None = None, unit=None) -> list[float]:
    """AdamW on Method.parameters() for ``steps`` batches; returns the loss per step."""
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(method.parameters(), lr=lr or cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    method.train()
    losses = []
    for batch in itertools.islice(batches(cfg, cfg.data.train_split, epochs=10_000, unit=unit), steps):
        out = method(batch)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(method.parameters(), 1.0)
        opt.step()
        losses.append(float(out["loss"]))
    return losses


def mean(xs):
    return sum(xs) / len(xs)
