"""Small builders shared by the loss tests."""

import torch
import torch.nn.functional as F

from xmr.config import Config
from xmr.losses.negatives import BankView
from xmr.losses.registry import TermContext, build_term
from xmr.outputs import PairOutputs


def make_cfg(task="category", k=10_000, strategy="uniform", temperature=0.1, margin=0.2, dim=16,
             num_classes=(5,), lambdas=None, **loss):
    cfg = Config()
    cfg.task = task
    cfg.model.embed_dim = dim
    cfg.model.hidden_dim = 32
    cfg.model.dims = {"a": [8], "b": [6]}
    cfg.model.num_classes = list(num_classes)
    cfg.model.label_kind = "single" if len(num_classes) == 1 else "hierarchical"
    cfg.negatives.k = k
    cfg.negatives.strategy = strategy
    cfg.loss.temperature = temperature
    cfg.loss.margin = margin
    cfg.loss.lambdas = lambdas or {"supcon": 1.0}
    for key, value in loss.items():  # a shared field, or a term's section as a dict: label={"scale": 20.0}
        if isinstance(value, dict):
            for field, v in value.items():
                setattr(getattr(cfg.loss, key), field, v)
        else:
            setattr(cfg.loss, key, value)
    return cfg


def term(name, cfg):
    return build_term(name, cfg)


def ctx(targets, bank=None) -> TermContext:
    """What the Method hands a term: the batch's relevance targets (labels, or pair ids) and the bank."""
    return TermContext(targets=targets, bank=bank)


def pair(a, b, **kw) -> PairOutputs:
    return PairOutputs(emb_a=a, emb_b=b, **kw)


def embeddings(n=12, dim=16, seed=0, classes=5):
    """Unnormalised leaf tensors (PML's cosine distance normalises; give ours ``unit(x)``)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=g).requires_grad_()
    b = torch.randn(n, dim, generator=g).requires_grad_()
    labels = torch.randint(0, classes, (n,), generator=g)
    return a, b, labels


def bank(n=9, dim=16, seed=9, classes=5) -> BankView:
    """A bank view of unit vectors with labels and alternating modality."""
    g = torch.Generator().manual_seed(seed)
    return BankView(F.normalize(torch.randn(n, dim, generator=g), dim=1), torch.randint(0, classes, (n,), generator=g),
                    (torch.arange(n) % 2).to(torch.uint8))


def unit(x):
    return F.normalize(x, dim=1)
