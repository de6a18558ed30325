"""Each loss term's own settings live in its section (``loss.vr_hinge.margin``), the old flat
keys still read, and a model computes exactly the outputs its built terms declare they need
(no model reads a loss weight)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from xmr.config import ConfigError, from_dict, load_config, with_values
from xmr.losses.registry import outputs_needed
from xmr.models.registry import build_model

MODELS = Path(__file__).resolve().parents[1] / "platform" / "xmr" / "models"


@pytest.mark.parametrize("old, new, value", [
    ("vr_margin", "vr_hinge.margin", 0.3), ("vr_query_negatives", "vr_hinge.query_negatives", True),
    ("video_cl_k", "video_cl.k", 4), ("poly_pos", "polynomial.pos", [1.0, -0.5]),
    ("poly_neg", "polynomial.neg", [1.0, 0.5]), ("adversarial_mode", "adversarial.mode", "flip"),
    ("grl_scale", "adversarial.grl_scale", 2.0), ("disc_lr", "adversarial.disc_lr", 0.01),
    ("disc_steps", "adversarial.disc_steps", 3), ("label_scale", "label.scale", 30.0),
    ("level_weights", "label.level_weights", [0.5, 1.0]),
])
def test_an_old_flat_key_sets_the_terms_field(old, new, value):
    term, field = new.split(".")
    for cfg in (load_config(None, [f"loss.{old}={yaml.safe_dump(value, default_flow_style=True).strip()}"]),
                from_dict({"loss": {old: value}}),  # a config stored in an older checkpoint
                with_values(load_config(None), {f"loss.{old}": value})):
        assert getattr(getattr(cfg.loss, term), field) == value


def test_an_override_wins_over_the_old_key_of_a_file(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("loss: {lambdas: {vr_hinge: 1.0}, vr_margin: 0.1}\ntask: vcmr\n")
    assert load_config(str(path), ["loss.vr_hinge.margin=0.4"]).loss.vr_hinge.margin == 0.4


def test_the_same_setting_twice_in_one_mapping_names_both_keys():
    with pytest.raises(ConfigError, match=r"loss\.vr_margin .* loss\.vr_hinge\.margin"):
        from_dict({"loss": {"vr_margin": 0.1, "vr_hinge": {"margin": 0.3}}})


def test_a_term_setting_is_typed_and_named():
    with pytest.raises(ConfigError, match=r"loss\.adversarial\.disc_steps"):
        load_config(None, ["loss.adversarial.disc_steps=0"])
    with pytest.raises(ConfigError, match=r"loss\.vr_hinge\.margin"):
        load_config(None, ["loss.vr_hinge.margin=wide"])


def test_outputs_follow_the_built_terms():
    cfg = load_config("qacln")
    assert set(outputs_needed(cfg)) == {"phi_q2v", "nce_q2v", "nce_v2q"}
    cfg = with_values(cfg, {"loss.vr_hinge.query_negatives": True, "loss.lambdas.video_cl": 0})
    assert outputs_needed(cfg) == {"phi_q2v": ["vr_hinge"], "phi_v2q": ["vr_hinge"]}
    assert outputs_needed(load_config("mixer_mae_pretrain")) == {"reconstruction": ["reconstruction"]}
    assert outputs_needed(load_config("mixer_mae")) == {}  # fine-tuning: no decoder built


def test_a_model_is_built_with_what_the_terms_need_and_refuses_what_it_cannot_compute():
    cfg = load_config("qacln")
    cfg.model.dims = {"visual": [6], "subtitle": [5], "query": [4]}
    model = build_model(cfg, outputs_needed(cfg))
    assert model.need_vr and model.need_video_cl and not model.need_vr_v2q
    pre = load_config("mixer_mae_pretrain")
    pre.model.dims = {"a": [8], "b": [6]}
    assert hasattr(build_model(pre, outputs_needed(pre)), "decoder")
    assert not hasattr(build_model(pre, {}), "decoder")
    plain = with_values(load_config("sccmrl"), {"loss.lambdas.reconstruction": 1.0})
    plain.model.dims = {"a": [8], "b": [6]}
    with pytest.raises(ConfigError, match="'reconstruction'.*mixer_mae"):
        build_model(plain, outputs_needed(plain))


def test_no_model_reads_a_loss_weight():
    assert not [p.name for p in MODELS.glob("*.py") if "lambdas" in p.read_text()]
