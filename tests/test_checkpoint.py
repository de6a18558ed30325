"""Checkpoints rebuild the method from their own config, never unpickle, and fail clearly."""

import pytest
import torch

from xmr.checkpoint import CheckpointError, load_checkpoint, load_method, save_checkpoint
from xmr.config import load_config
from xmr.method import Method

pytestmark = pytest.mark.timeout(60)


def small_cfg():
    cfg = load_config("sccmrl", ["model.embed_dim=8", "model.hidden_dim=16"])
    cfg.model.dims = {"a": [6], "b": [5]}
    cfg.model.num_classes = [3]
    return cfg


def batch(n=12):
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(n, 6, generator=g), "b": torch.randn(n, 5, generator=g),
            "label": torch.arange(n) % 3, "index": torch.arange(n), "key": [str(i) for i in range(n)]}


def test_round_trip_rebuilds_from_config_alone(tmp_path):
    torch.manual_seed(0)
    cfg = small_cfg()
    method = Method(cfg).eval()
    save_checkpoint(tmp_path / "ck", method, cfg, metrics={"map_mean": 0.5}, step=7)
    cfg2, state, meta = load_checkpoint(tmp_path / "ck")
    assert cfg2 == cfg
    assert meta == {"metrics": {"map_mean": 0.5}, "step": 7}
    again = load_method(tmp_path / "ck").eval()
    b = batch()
    with torch.no_grad():
        for key, value in method(b).items():
            assert torch.allclose(value, again(b)[key]), key
    assert state.keys() == method.state_dict().keys()


def test_truncated_weights_give_a_clear_error(tmp_path):
    cfg = small_cfg()
    path = save_checkpoint(tmp_path / "ck", Method(cfg), cfg) / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable or truncated"):
        load_checkpoint(tmp_path / "ck")


def test_missing_files_and_mismatched_weights(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "empty")
    cfg = small_cfg()
    save_checkpoint(tmp_path / "ck", Method(cfg), cfg)
    bigger = small_cfg()
    bigger.model.embed_dim = 16
    (tmp_path / "ck" / "config.yaml").write_text(bigger.to_yaml())
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_method(tmp_path / "ck")
