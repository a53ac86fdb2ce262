"""The paper's metric on a SentencePiece-style (Metaspace, byte-fallback) tokenizer, as Mistral's.

The tokenizer is built offline with the ``tokenizers`` library in Mistral's layout: ``<unk>``,
``<s>``, ``</s>``, then the 256 byte tokens (so ``<0x0A>``, the newline, is id 13 as in Mistral),
then ``▁`` and single characters, with ``▁A``-style merges for letters only (digits stay split:
``" 72"`` is ``▁``, ``7``, ``2``). ``tokenizer("\\n")`` is ``▁``, ``<0x0A>`` and BOS is added by the
post-processor, while ``add_bos_token`` reads False after a reload, as with the real Mistral
tokenizer in transformers v5. Three flavours: transformers' ``LlamaTokenizer`` built from the
vocabulary, Mistral's tokenizer.json loaded from a hub-style folder, and that tokenizer.json run with
its own legacy normaliser; the first two also after ``save_pretrained`` + reload.

The expected scores are computed here independently, following the reference's
``eval_helpers.compute_metrics`` step by step (hard-coded valid ids, the answer located by
decoding, the numeric offset, a softmax over the full vocabulary then filtered and renormalised).
"""

import importlib.util
import json
import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import AutoTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast

from quietstar import QuietStarForCausalLM
from quietstar.evaluation import load_examples, paper_metric, valid_token_ids
from quietstar.evaluation.metric import leading_special_ids, newline_token_id
from tiny_models import tiny_base

BOS, NEWLINE = 1, 13  # Mistral's ids: <s> and <0x0A>


def _vocab_and_merges():
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    vocab["▁"] = len(vocab)
    for char in string.ascii_letters + string.digits + string.punctuation:
        vocab[char] = len(vocab)
    merges = []
    for letter in string.ascii_letters:  # "▁A", "▁b", ...: a letter fuses with the space before it, digits do not
        vocab["▁" + letter] = len(vocab)
        merges.append(("▁", letter))
    return vocab, merges


def llama_tokenizer():
    """transformers' own Llama tokenizer (Metaspace pre-tokenizer, byte fallback) over the vocabulary."""
    vocab, merges = _vocab_and_merges()
    return LlamaTokenizerFast(vocab=vocab, merges=merges, add_bos_token=True)


def mistral_tokenizer_json():
    """A ``tokenizers.Tokenizer`` laid out as Mistral-7B-v0.1's tokenizer.json (SentencePiece's legacy
    normaliser: prepend ``▁``, spaces to ``▁``; the post-processor adds ``<s>``)."""
    vocab, merges = _vocab_and_merges()
    raw = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    return raw


def hub_style_tokenizer(folder):
    """Mistral's tokenizer.json + tokenizer_config.json as on the hub, loaded with AutoTokenizer (which
    rebuilds it as a Metaspace LlamaTokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    mistral_tokenizer_json().save(str(folder / "tokenizer.json"))
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "tokenizer_class": "LlamaTokenizer", "legacy": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(folder)


def legacy_tokenizer():
    """Mistral's tokenizer.json wrapped as it is (its own normaliser, as transformers 4.x ran it)."""
    return PreTrainedTokenizerFast(tokenizer_object=mistral_tokenizer_json(), bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def reloaded(tokenizer, folder):
    tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(params=["llama", "llama-reloaded", "hub", "hub-reloaded", "legacy"])
def sp_tokenizer(request, tmp_path):
    if request.param.startswith("llama"):
        tok = llama_tokenizer()
    elif request.param.startswith("hub"):
        tok = hub_style_tokenizer(tmp_path / "hub")
    else:
        tok = legacy_tokenizer()
        assert tok(" B\n", add_special_tokens=False)["input_ids"][:2] == tok.convert_tokens_to_ids(["▁", "▁B"])  # not as in context
    if request.param.endswith("reloaded"):
        tok = reloaded(tok, tmp_path / "reloaded")
    return tok


def thinking_model(vocab_size, seed=0):
    """A tiny Llama whose predictions are peaked (large init) and whose thoughts matter (a non-zero head).

    Greedy thoughts, so that two forwards of the same ids give the same logits.
    """
    base = tiny_base("llama", seed=seed, vocab_size=vocab_size, max_position_embeddings=512, initializer_range=0.5)
    model = QuietStarForCausalLM.from_base(base, n_thought_tokens=2, n_talk_tokens=2, n_passes=1, thought_temperature=0.0).eval()
    with torch.no_grad():  # the head's hidden layers at a moderate scale (the base's 0.5 init range would blow w up)
        g = torch.Generator().manual_seed(seed)
        for layer in model.mixing_head.mlp[:-1]:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 0.1, generator=g)
        model.mixing_head.mlp[-1].weight.normal_(0, 3.0, generator=g)
    return model


# ---------------------------------------------------------------- the reference's formula, written out


def reference_texts(task, rows):
    """``eval_helpers.preprocess_eval_function_gsm`` / ``_csqa``: the whole text, scored as one."""
    if task == "gsm8k":
        return ["Q: " + r["question"] + "\nA:" + r["answer"].split("####")[-1] + "\n" for r in rows]
    texts = []
    for r in rows:
        choices = "\n".join(f"({label}) {text}" for label, text in zip(r["choices"]["label"], r["choices"]["text"]))
        texts.append(f"Q: {r['question']}" + "\n" + choices + "\nA:" + " " + r["answerKey"] + "\n")
    return texts


def reference_score(tokenizer, logits_of, task, rows):
    """``eval_helpers.compute_metrics`` for one question at a time (no padding)."""
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "0123456789"] + [NEWLINE]
    letters = [tokenizer.convert_tokens_to_ids("▁" + x) for x in "ABCDE"] + [NEWLINE]
    scores = []
    for text in reference_texts(task, rows):
        question = tokenizer.encode(text)  # with the tokenizer's special tokens, as the reference
        assert question[0] == BOS
        logits = logits_of(question)
        is_numeric = tokenizer.decode(question).split("\nA:")[-1][1].isdigit()
        assert is_numeric == (task == "gsm8k")
        valid = digits if is_numeric else letters
        count = tokenizer.decode(question).count("\nA:")
        for i in range(len(question) - 1, 0, -1):  # i: the token that completes the last "\nA:"
            if tokenizer.decode(question[:i]).count("\nA:") < count:
                break
        prob = 1.0
        guess = torch.softmax(logits.double(), dim=-1)  # the reference recomputes this inside the loop
        for j in range(i + (1 if is_numeric else 0), len(question) - 1):
            true_token = question[j + 1]
            if true_token not in valid:
                continue
            filtered = torch.zeros_like(guess)
            filtered[:, valid] = guess[:, valid]
            filtered = filtered / filtered.sum(dim=-1, keepdim=True)
            prob *= float(filtered[j, true_token])
        scores.append(prob)
    return scores


def model_logits(model, use_thoughts=True):
    def logits_of(ids):
        with torch.no_grad():
            out = model(torch.tensor([ids]))
        return (out.logits if use_thoughts else out.base_logits)[0]

    return logits_of


# ---------------------------------------------------------------- tests


def clearly_different(a, b):
    return abs(a - b) > 0.1 * max(abs(a), abs(b))


def test_valid_ids_are_the_references_for_a_sentencepiece_tokenizer(sp_tokenizer):
    tok = sp_tokenizer
    assert tok("\n", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("▁"), NEWLINE]  # the trap
    assert newline_token_id(tok, "gsm8k") == newline_token_id(tok, "commonsense_qa") == NEWLINE
    digits = [tok.convert_tokens_to_ids(d) for d in "0123456789"]
    letters = [tok.convert_tokens_to_ids("▁" + x) for x in "ABCDE"]
    assert valid_token_ids(tok, "gsm8k") == sorted(digits + [NEWLINE])
    assert valid_token_ids(tok, "commonsense_qa") == sorted(letters + [NEWLINE])
    assert leading_special_ids(tok) == [BOS]  # whatever add_bos_token says after a reload


@pytest.mark.parametrize("task", ["gsm8k", "commonsense_qa"])
def test_metric_equals_the_references_formula(sp_tokenizer, task):
    tok = sp_tokenizer
    rows = load_examples(task, limit=3)
    model = thinking_model(len(_vocab_and_merges()[0]))
    for use_thoughts in (True, False):
        expected = reference_score(tok, model_logits(model, use_thoughts), task, rows)
        got = paper_metric(model, tok, rows, task, batch_size=2, use_thoughts=use_thoughts)
        assert got["per_example"] == pytest.approx(expected, rel=1e-5, abs=1e-12)
        assert got["score"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_the_newline_factor_and_bos_both_count():
    """The reference's score differs from a metric without the newline factor, and from one without BOS."""
    tok = llama_tokenizer()
    rows = load_examples("commonsense_qa", limit=3)
    model = thinking_model(len(_vocab_and_merges()[0]))
    expected = reference_score(tok, model_logits(model), "commonsense_qa", rows)
    letter_only = []
    for text in reference_texts("commonsense_qa", rows):
        ids = tok.encode(text)
        letters = [tok.convert_tokens_to_ids("▁" + x) for x in "ABCDE"]
        logits = model_logits(model)(ids)
        letter_only.append(float(torch.softmax(logits[-3, letters].double(), -1)[letters.index(ids[-2])]))
    assert all(clearly_different(e, x) for e, x in zip(expected, letter_only))
    def logits_without_bos(ids):  # row j still predicts ids[j + 1]; row 0 (after BOS) is never an answer row
        rest = model_logits(model)(ids[1:])
        return torch.cat([torch.zeros_like(rest[:1]), rest])


    without_bos = reference_score(tok, logits_without_bos, "commonsense_qa", rows)
    assert all(clearly_different(e, x) for e, x in zip(expected, without_bos))


def test_long_prompts_keep_bos_and_the_whole_answer():
    tok = llama_tokenizer()
    rows = load_examples("gsm8k", limit=2)
    model = thinking_model(len(_vocab_and_merges()[0]))
    cut = 40
    got = paper_metric(model, tok, rows, "gsm8k", max_length=cut)["per_example"]
    # the score of BOS + the last cut - 1 tokens (the reference would crop a random window, maybe without the answer)
    for row, score in zip(rows, got):
        ids = tok.encode(reference_texts("gsm8k", [row])[0])
        kept = [BOS] + ids[-(cut - 1):]
        assert len(kept) == cut
        logits = model_logits(model)(kept)
        digits = valid_token_ids(tok, "gsm8k")
        answer = len(kept) - 1 - kept[::-1].index(tok.convert_tokens_to_ids(":"))  # the ':' of the last "\nA:"
        prob = 1.0
        for t in range(answer + 1, len(kept)):
            if kept[t] in digits:
                prob *= float(torch.softmax(logits[t - 1, digits].double(), -1)[digits.index(kept[t])])
        assert score == pytest.approx(prob, rel=1e-5)
    with pytest.raises(ValueError, match="max_length 3 leaves no room"):
        paper_metric(model, tok, rows, "gsm8k", max_length=3)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (pip install 'quietstar[eval]')")
def test_lm_eval_task_equals_the_paper_metric_and_sees_the_thoughts(tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from quietstar.evaluation.harness import QuietStarLM, tasks_dir

    tok = reloaded(llama_tokenizer(), tmp_path / "tok")  # BOS from the post-processor only
    tok.pad_token = "</s>"
    model = thinking_model(len(_vocab_and_merges()[0]))
    rows = load_examples("commonsense_qa", limit=6)
    thinking = paper_metric(model, tok, rows, "commonsense_qa")["score"]
    base = paper_metric(model, tok, rows, "commonsense_qa", use_thoughts=False)["score"]
    assert clearly_different(thinking, base)  # the model's thoughts change its answers

    def task_score(use_thoughts):
        lm = QuietStarLM(pretrained=model, tokenizer=tok, batch_size=6, max_length=512, thought_temperature=0.0,
                         use_thoughts=use_thoughts)
        out = simple_evaluate(model=lm, tasks=["quietstar_commonsense_qa_sample"], task_manager=TaskManager(include_path=tasks_dir()),
                              limit=6, bootstrap_iters=0)
        metrics = out["results"]["quietstar_commonsense_qa_sample"]
        assert 0.0 <= metrics["acc,none"] <= 1.0
        return metrics["paper_score,none"], lm

    score, lm = task_score(True)
    assert score == pytest.approx(thinking, rel=1e-4)
    assert task_score(False)[0] == pytest.approx(base, rel=1e-4)
    # and a generation request through the thinking generate()
    (text,) = lm.generate_until([_request("Q: 1+1\nA:", {"until": ["\n"], "max_gen_toks": 5, "do_sample": False})])
    assert isinstance(text, str)


def _request(context, gen_kwargs):
    from lm_eval.api.instance import Instance

    return Instance(request_type="generate_until", doc={}, arguments=(context, gen_kwargs), idx=0)


def test_tokenizers_the_metric_cannot_serve_are_refused():
    from tokenizers import Regex, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)]
    merged = [s + "\n" for s in "ABCDE0123456789"]  # the newline fused with the answer symbol
    raw = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(chars + merged)}, unk_token="?"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[A-E0-9]\n|[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="?")
    with pytest.raises(ValueError, match="one newline token"):
        valid_token_ids(tok, "commonsense_qa")
    no_letters = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(c for c in chars if c not in "ABCDE")}, unk_token="?"))
    no_letters.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    with pytest.raises(ValueError, match="no single-token form of each of 'ABCDE'"):
        valid_token_ids(PreTrainedTokenizerFast(tokenizer_object=no_letters, unk_token="?"), "commonsense_qa")
