"""The experiment's corpus: generated problems or the first documents of a dataset, split disjointly."""

import json
from pathlib import Path

import pytest

from quietstar.experiment import math_text
from quietstar.experiment.corpus import CorpusConfig, prepare_corpus
from quietstar.experiment.runner import load_experiment_config, run_experiment
from quietstar.training.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "train" / "experiments" / "tiny.yaml")


def _documents(n):
    # Worked arithmetic, varied enough to be distinct documents.
    return [f"Problem {i}: {i} + {2 * i} = {3 * i}. So the answer is {3 * i}." for i in range(n)]


def _write_dataset(path, texts):
    path.write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def test_a_dataset_corpus_holds_out_the_first_documents_and_drops_their_copies(tmp_path):
    texts = _documents(30)
    texts[20] = "  " + texts[3].replace(" ", "  ") + "\n"  # a held-out document again, whitespace changed
    source = _write_dataset(tmp_path / "docs.jsonl", texts)
    cfg = CorpusConfig(source=str(source), text_field="body", n_train=25, n_heldout=5)
    paths = prepare_corpus(cfg, tmp_path / "out")
    heldout = paths["heldout"].read_text(encoding="utf-8").strip().split("\n\n")
    train = [json.loads(line)["text"] for line in paths["train"].read_text(encoding="utf-8").splitlines()]
    assert heldout == texts[:5]
    assert train == texts[5:20] + texts[21:]  # documents 5..29 (n_train 25 after 5 held out), minus the copy
    assert not {" ".join(t.split()) for t in train} & {" ".join(t.split()) for t in heldout}


def test_the_generated_corpus_is_the_math_text_generator(tmp_path):
    paths = prepare_corpus(CorpusConfig(n_train=20, n_heldout=5, seed=3), tmp_path / "a")
    direct = math_text.write_corpus(tmp_path / "b", 20, 5, 3)
    for name in ("train", "heldout", "heldout_gsm8k"):
        assert paths[name].read_bytes() == direct[name].read_bytes()


def test_bad_corpus_settings_are_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="metric_source 'corpus' needs the generated corpus"):
        load_experiment_config(TINY, ["corpus.source=open-web-math/open-web-math"])
    with pytest.raises(ConfigError, match="n_heldout must be >= 1"):
        load_experiment_config(TINY, ["corpus.n_heldout=0"])
    source = _write_dataset(tmp_path / "few.jsonl", _documents(4))
    with pytest.raises(ConfigError, match="too few for 5 held out"):
        prepare_corpus(CorpusConfig(source=str(source), text_field="body", n_train=10, n_heldout=5), tmp_path / "out")


def test_the_experiment_trains_and_scores_on_a_dataset_corpus(tmp_path):
    source = _write_dataset(tmp_path / "docs.jsonl", _documents(40))
    cfg = load_experiment_config(TINY, [f"output_dir={tmp_path / 'exp'}", f"corpus.source={source}", "corpus.text_field=body",
                                        "corpus.n_train=30", "corpus.n_heldout=10", "metric_limit=0", "run.optim.steps=2",
                                        "heldout.every=0", "arms.curriculum.enabled=false", "students.kinds=[]",
                                        "heldout.other_style=null"])
    results = run_experiment(cfg)
    assert {(a["arm"], a["seed"]) for a in results["runs"]} == {("thinking", 0), ("control", 0)}
    assert len(results["base"]["rows"]["untouched base"]["per_token"]["generated"]) > 0
    assert results["summary"]["Quiet-STaR, thinking"]["metric"]["n"] == 0
    assert all(len(a["history"]) == 2 for a in results["runs"])
