"""The claims table and the issue-39 specs: every shipped spec's every claim is listed under a
paper claim, every new spec parses and validates (with its data's provenance and what it
cannot test), and the table shows each paper claim with its verdicts, "not run yet", or why
it cannot be tested here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from xmr.compare.claims_table import NOT_RUN, PAPER_CLAIMS, claims_table, stored_verdicts, with_claims_table
from xmr.compare.spec import SPEC_DIR, load_spec
from xmr.config import SpecError

NEW_SPECS = ("digits_sccmrl_terms", "synth_sccmrl_label", "digits_mnsgan_terms", "synth_mnsgan_terms",
             "digits_cdaml_terms", "synth_cdaml_terms", "digits_mixer_vs_dual", "synth_mixer_vs_dual",
             "qacln_vs_triplet", "map_qcf_real_mix")


def _spec_claims() -> dict[str, set[str]]:
    """Each shipped spec's claims as written ("a > b"), read from the YAML alone."""
    out = {}
    for path in sorted(SPEC_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        out[raw.get("name") or path.stem] = {" ".join(str(c).split()) for c in raw.get("claims") or []}
    return out


def test_every_spec_claim_is_listed_under_a_paper_claim_and_every_listed_test_exists() -> None:
    listed = {(t.spec, t.claim) for c in PAPER_CLAIMS for t in c.tests}
    shipped = {(s, c) for s, claims in _spec_claims().items() for c in claims}
    assert shipped - listed == set(), "spec claims no paper claim lists (add them to PAPER_CLAIMS)"
    assert listed - shipped == set(), "PAPER_CLAIMS names spec claims that no spec makes"
    assert {t.data for c in PAPER_CLAIMS for t in c.tests} <= {"real", "part_real", "generated"}


@pytest.mark.parametrize("name", NEW_SPECS)
def test_new_spec_parses_validates_and_says_where_its_data_come_from(name: str) -> None:
    spec = load_spec(name)
    assert spec.claims and spec.data_from, name
    real = spec.dataset["synth"]["kind"] == "digits_views"
    assert spec.data_kind == ("real" if real else "generated")
    assert bool(spec.premise) != real, "generated data state their premise; real data plant none"


# one spec per kind of recipe: real digits (a size and all), generated categories with a
# hierarchy, a generated VCMR corpus at TVR's mix and weak cue (fewer videos: the recipe is tested)
@pytest.mark.parametrize("name", ["digits_sccmrl_terms", "digits_mixer_vs_dual", "synth_cdaml_terms", "map_qcf_real_mix"])
def test_new_spec_builds_its_dataset(name: str, tmp_path: Path) -> None:
    from xmr.compare.runner import ensure_dataset
    from xmr.data.manifest import load_manifest

    spec = load_spec(name)
    recipe = {**spec.dataset_at(spec.levels[0]), "path": str(tmp_path / "data")}
    if recipe["synth"]["kind"] == "vcmr":
        recipe["synth"] = {**recipe["synth"], "splits": {"train": 8, "val": 4, "test": 4}}
    m = load_manifest(ensure_dataset(recipe))
    assert set(m.splits) == {"train", "val", "test"} and all(s.num_samples > 0 for s in m.splits.values())
    assert m.source["kind"] == ("digits-views" if spec.data_kind == "real" else f"synth-{m.task}")


def test_category_and_pair_claims_have_a_real_data_spec_beside_the_generated_one() -> None:
    for c in PAPER_CLAIMS:
        if c.paper in ("SCCMRL", "MNS-GAN", "Mixer", "CDAML") and c.tests:
            real = [t for t in c.tests if t.data in ("real", "part_real")]
            assert real or "hierarch" in c.not_testable, c.claim


def test_spec_fields_for_provenance_and_what_cannot_be_tested(tmp_path: Path) -> None:
    spec = load_spec("digits_cdaml_terms")
    assert "hierarchy" in spec.not_testable and "digits" in spec.data_from
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "metric": "map_mean", "dataset": {"path": "d"},
                                   "variants": {"a": {"preset": "sccmrl"}}, "not_testabel": "typo"}))
    with pytest.raises(SpecError, match="not_testabel"):
        load_spec(str(bad))


def test_table_lists_every_paper_claim_with_not_run_yet_and_reasons() -> None:
    table = claims_table("")
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| paper")]
    assert len(rows) == len(PAPER_CLAIMS)
    for c, row in zip(PAPER_CLAIMS, rows):
        assert row.startswith(f"| {c.paper} | {c.claim} | {c.number} |")
        for t in c.tests:
            assert f"`{t.spec}` · `{t.claim}`: {NOT_RUN}" in row
        if not c.tests:  # a claim with no spec shows its reason
            assert c.not_testable and row.endswith(f"| – | – | {c.not_testable} |")
    hierarchy = next(r for r in rows if "hierarchical labels" in r)
    assert "No real data here has a label hierarchy" in hierarchy


def test_table_reads_stored_verdicts_from_the_page_into_their_columns() -> None:
    page = ('<!-- xmr-compare:digits_sccmrl_terms:start -->\n## digits_sccmrl_terms\n'
            '<!-- claims [{"spec": "digits_sccmrl_terms", "claim": "sccmrl > sccmrl_no_label", "level": null, '
            '"mean": 0.0213, "verdict": "held"}] -->\n<!-- xmr-compare:digits_sccmrl_terms:end -->\n'
            '<!-- xmr-compare:map_center_modality_gap:start -->\n'
            '<!-- claims [{"spec": "map_center_modality_gap", "claim": "sccmrl > sccmrl_no_center", "level": 0.0, '
            '"mean": 0.009, "verdict": "held"}, {"spec": "map_center_modality_gap", "claim": '
            '"sccmrl > sccmrl_no_center", "level": 1.5, "mean": 0.008, "verdict": "equivalent"}] -->\n'
            '<!-- xmr-compare:map_center_modality_gap:end -->\n')
    assert len(stored_verdicts(page)[("map_center_modality_gap", "sccmrl > sccmrl_no_center")]) == 2
    rows = {line.split(" | ")[1]: line.split(" | ") for line in claims_table(page).splitlines() if line.startswith("| SCCMRL")}
    label = rows["The label loss (semantic discrimination) helps."]
    assert "`digits_sccmrl_terms` · `sccmrl > sccmrl_no_label`: held +0.021" in label[3]  # real column
    assert f"`synth_sccmrl_label` · `sccmrl > sccmrl_no_label`: {NOT_RUN}" in label[4]  # generated column
    center = rows["The center loss (modality consistency) helps."]
    assert "held +0.009 at 0.0; equivalent +0.008 at 1.5" in center[4]


def test_claims_block_goes_before_the_notes_and_is_replaced_in_place() -> None:
    page = "# Results\n\nhead\n\n<!-- xmr-notes:start -->\nnotes\n<!-- xmr-notes:end -->\n\n## All claims\n"
    once = with_claims_table(page)
    assert once.index("## The papers' claims") < once.index("<!-- xmr-notes:start -->")
    assert with_claims_table(once) == once and once.count("<!-- xmr-claims:start -->") == 1
