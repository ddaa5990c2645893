"""Feature cards on a real run folder: a tiny pair's harvest (with provenance), a DFC checkpoint fitted on it,
results.jsonl whose attribution terms come from that checkpoint, and the run's spec.yaml."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
import yaml

from dfc_ray import cli, store
from dfc_ray.attribution import attribute
from dfc_ray.cards import CARDS, REFERENCE, causal_evidence, feature_cards, unembedding
from dfc_ray.config import CardConfig, CorpusSpec, DFCConfig, HarvestConfig
from dfc_ray.harvest import harvest
from dfc_ray.pair import load_model, load_tokenizer
from test_interventions import fit_dfc

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = 1


def spec_yaml(pair) -> dict:
    return {"name": "tiny", "pair": {"a": pair.a, "b": pair.b, "tokenizer": pair.tokenizer}, "layers": [LAYER],
            "harvest": {"tasks": "organism:dev", "n_tasks": 16, "plain_text": "organism", "n_plain": 16,
                        "positions": "all_tokens", "batch_size": 16, "shard_rows": 512},
            "crosscoder": {"k": 4}, "train": {"steps": 30, "batch_size": 32},
            "grid": {"dict_size": [64]}, "objective": {"metric": "fvu", "mode": "min"}}


@pytest.fixture(scope="module")
def run(tiny_pair, tmp_path_factory):
    """(run folder, store URI, checkpoint): one DFC trial whose metrics name real attribution terms."""
    root = tmp_path_factory.mktemp("cards")
    corpus = CorpusSpec(tasks="organism:dev", n_tasks=16, plain_text="organism", n_plain=16, max_tokens=256)
    uri = harvest(HarvestConfig(store=str(root / "store"), layers=(LAYER,), pair=tiny_pair, corpus=corpus,
                                positions="all_tokens", batch_size=16, shard_rows=512), use_ray=False,
                  progress=False).uri
    x = torch.cat([rows for rows, _ in store.iter_shards(uri, LAYER)])
    checkpoint = root / "run" / "checkpoints" / "trial_0"
    cc = fit_dfc(DFCConfig(d_model=32, dict_size=64, k=4, a_exclusive=0.125, b_exclusive=0.125), x, 150)
    cc.save(checkpoint)
    att = attribute(cc, x, 6)
    metrics = {**att.metrics(), "checkpoint": str(checkpoint), "harvest_store": uri, "diff_top": att.top_rows(),
               "loc_curve_n": 2,
               "loc_curve_pp": 4.0, "loc_curve_pp_lo": -1.0, "loc_curve_pp_hi": 9.0,
               "steer_feature": att.top[0].feature, "steer_target": "b", "steer_alpha": 0.8, "steer_delta_pp": 5.0,
               "steer_delta_pp_lo": 1.0, "steer_delta_pp_hi": 9.0}
    run = root / "run"
    (run / "spec.yaml").write_text(yaml.safe_dump(spec_yaml(tiny_pair)))
    (run / "results.jsonl").write_text(json.dumps({"trial_id": "trial_0", "config": {"dict_size": 64, "layer": 1},
                                                   "metrics": metrics, "status": "ok"}) + "\n")
    return run, uri, checkpoint


def test_a_card_counts_what_the_crosscoder_encodes_and_shows_where(run, tiny_pair):
    _, uri, checkpoint = run
    from dfc_ray.evaluate import load_crosscoder

    cc = load_crosscoder(str(checkpoint), "cpu")
    x = torch.cat([rows for rows, _ in store.iter_shards(uri, LAYER)])
    codes = cc.encode(x).detach()
    features = [int(codes.gt(0).float().mean(0).argmax()), 0, 40]
    lenses = (unembedding(load_model(tiny_pair, "a")), unembedding(load_model(tiny_pair, "b")))
    cards = feature_cards(cc, uri, LAYER, features, "trial_0", load_tokenizer(tiny_pair), lenses, CardConfig(top=4))
    provenance = np.concatenate([p for _, p in store.iter_shards(uri, LAYER)])
    corpus = store.read_corpus(uri)
    for card, j in zip(cards, features):
        fired = codes[:, j] > 0
        assert card.frequency == pytest.approx(float(fired.float().mean())) and card.n_rows == len(x)
        assert sum(card.histogram["counts"]) == int(fired.sum())
        assert f"all {len(x)} rows (all_tokens)" in card.row_set and not card.note
        top = codes[:, j].topk(min(4, int(fired.sum()))).values.tolist()
        assert [e.activation for e in card.top_examples] == pytest.approx(top, rel=1e-5)
        for e in card.top_examples:  # the marked token is the row's own, read from the corpus
            row = int(np.nonzero((provenance[:, 0] == e.record) & (provenance[:, 1] == e.position))[0][0])
            assert codes[row, j] == pytest.approx(e.activation, rel=1e-5)
            assert e.tokens[e.marked] == load_tokenizer(tiny_pair).decode([int(corpus[e.record][e.position])])
        assert {"a", "b", "diff"} == set(card.logit_lens)
    assert cards[0].partition == ("a_exclusive" if features[0] < 8 else "shared" if features[0] >= 16 else
                                  "b_exclusive")
    with pytest.raises(ValueError, match="feature 64: expected an index in \\[0, 64\\)"):
        feature_cards(cc, uri, LAYER, [64], "trial_0", None, lenses)


def test_a_store_without_provenance_says_how_to_get_it(run, tiny_pair, tmp_path):
    _, uri, checkpoint = run
    from dfc_ray.evaluate import load_crosscoder

    spec = store.read_manifest(uri, LAYER).spec
    with store.ShardWriter(str(tmp_path), spec) as writer:  # the same rows, written as before provenance
        for rows, _ in store.iter_shards(uri, LAYER):
            writer.append(rows)
    lenses = (unembedding(load_model(tiny_pair, "a")), unembedding(load_model(tiny_pair, "b")))
    card, = feature_cards(load_crosscoder(str(checkpoint), "cpu"), str(tmp_path), LAYER, [20], "t",
                          load_tokenizer(tiny_pair), lenses)
    assert card.top_examples == [] and card.note.endswith(store.REHARVEST) and card.n_rows > 0


def test_causal_evidence_reads_the_trials_metrics():
    metrics = {"diff_top": [{"feature": 7, "partition": "shared", "contribution": 2.0, "share": 0.5},
                            {"feature": 3, "partition": "b_exclusive", "contribution": 1.0, "share": 0.25}],
               "loc_curve_n": 1, "loc_curve_pp": 3.0, "loc_ablate_b_n": 1, "steer_feature": 3, "steer_delta_pp": 2.0}
    assert causal_evidence(metrics, 7)["localisation"] == {"curve": {"n": 1, "pp": 3.0, "lo": None, "hi": None}}
    three = causal_evidence(metrics, 3)
    assert three["attribution"]["rank"] == 2 and three["steering"]["delta_pp"] == 2.0
    assert set(three["localisation"]) == {"ablate_b"} and causal_evidence(metrics, 5) == {}


def test_features_command_prints_cards_and_writes_the_contract(run, capsys):
    folder, _, _ = run
    assert cli.main(["features", str(folder), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "trial trial_0 · feature" in out and "reference direction v" in out
    cards = json.loads((folder / CARDS).read_text())
    assert len(cards) == 3 and cards[-1]["feature"] == REFERENCE
    for card in cards:
        assert {"trial", "layer", "feature", "partition", "frequency", "row_set", "top_examples",
                "logit_lens"} <= set(card)
        assert set(card["logit_lens"]) == {"a", "b", "diff"}
        for e in card["top_examples"]:
            assert {"record", "position", "activation", "tokens", "token_activations"} <= set(e)
    assert cards[0]["causal"]["steering"]["delta_pp"] == 5.0  # the first attribution term was steered
    # asked again with the same settings: the cards come from the file, as they were (no pass over the store)
    assert cli.main(["features", str(folder), "--top", "1"]) == 0
    assert "2 cards from" in capsys.readouterr().out and json.loads((folder / CARDS).read_text()) == cards
    # other settings (fewer rows): computed again, and the file keeps the cards it does not replace
    assert cli.main(["features", str(folder), "--top", "1", "--rows", "50"]) == 0
    merged = json.loads((folder / CARDS).read_text())
    assert "wrote 2 cards" in capsys.readouterr().out and len(merged) == 5 and merged[:3] == cards
    assert all(c["settings"]["rows"] == 50 and c["n_rows"] == 50 for c in merged[3:])
    (folder / CARDS).write_text('{"not": "a list of cards"}')  # damaged: computed again, and rewritten whole
    assert cli.main(["features", str(folder), "--top", "1"]) == 0
    assert "wrote 2 cards" in capsys.readouterr().out and len(json.loads((folder / CARDS).read_text())) == 2
    assert cli.main(["features", str(folder), "--trial", "nope", "--feature", "1"]) == 2
    assert "--trial nope: not a finished trial" in capsys.readouterr().err


class Page(HTMLParser):
    """The ids, in-page links and external references of an HTML page."""

    def __init__(self):
        super().__init__()
        self.ids, self.links, self.external = set(), [], []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "id":
                self.ids.add(value)
            if name == "href" and value.startswith("#"):
                self.links.append(value[1:])
            if name in ("href", "src") and not value.startswith(("#", "data:")):
                self.external.append(value)


def test_report_html_is_self_contained_and_links_every_named_feature_to_its_card(run):
    from dfc_ray.report import write_report
    from dfc_ray.report.html import card_anchor

    folder, _, _ = run
    report = write_report(folder)
    page = Page()
    page.feed((folder / "report.html").read_text())
    cards = json.loads((folder / CARDS).read_text())
    named = [c for c in cards if c["feature"] != REFERENCE]
    # the largest terms and the curve's top 2 (loc_curve_n) of the one trial, the steered one among them
    assert {c["feature"] for c in named} == {t["feature"] for t in report["largest_terms"]}
    assert all(card_anchor(c["trial"], c["feature"]) in page.ids for c in named) and "reference-1" in page.ids
    assert set(page.links) <= page.ids and page.external == []
    assert {card_anchor("trial_0", t["feature"]) for t in report["largest_terms"]} <= set(page.links)
    # logit-lens tokens read as written (a `<|im_end|>` as such, never JSON's \u003c escape)
    lens_tokens = [tok[0] for c in cards for lens in c["logit_lens"].values() for tok in lens["top"]]
    assert lens_tokens and "\\u003c" not in (folder / "report.html").read_text()
