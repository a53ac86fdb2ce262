"""The student is the base architecture: made from a Quiet-STaR model, exported as a plain checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import padded_batch, tiny_base
from torch import nn

from quietstar import END_THOUGHT_TOKEN, START_THOUGHT_TOKEN, QuietStarForCausalLM
from quietstar.assets import byte_tokenizer, tiny_random_llama
from quietstar.ntp import export_student, forward_student, freeze_teacher, make_student


def logits_tolerance(reference: torch.Tensor) -> dict:
    """Same weights, two attention kernels or thread counts: only the fp32 summation order differs,
    a few hundred ulps of the logits' magnitude at most (64 eps x max|logit| x a margin of 4)."""
    return {"rtol": 0.0, "atol": 256 * torch.finfo(torch.float32).eps * max(1.0, reference.abs().max().item())}


def teacher_with_tokenizer(table_rows: int):
    """A tied tiny Llama over the byte tokenizer (257 ids); the delimiters get ids 257, 258."""
    tokenizer = byte_tokenizer()
    base = tiny_random_llama(table_rows, seed=0)
    model = QuietStarForCausalLM.from_base(base, tokenizer=tokenizer, n_thought_tokens=2, n_talk_tokens=2)
    return freeze_teacher(model), tokenizer


def test_student_is_the_base_class_with_a_plain_tied_embedding():
    teacher, _ = teacher_with_tokenizer(257)
    student = make_student(teacher)
    assert type(student) is type(teacher.base_lm) and type(student).__name__ == "LlamaForCausalLM"
    assert type(student.get_input_embeddings()) is nn.Embedding
    assert student.get_input_embeddings().weight is student.get_output_embeddings().weight  # still tied
    assert student.get_input_embeddings().weight is not teacher.base_lm.get_input_embeddings().weight  # a copy
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any("delimiter" in name for name, _ in student.named_parameters())
    ids, mask = padded_batch(2, 9, "left", seed=3)
    with torch.no_grad():
        out = teacher(ids, attention_mask=mask, generator=torch.Generator().manual_seed(0))
        base_logits = out.base_logits[:: teacher.config.n_passes]  # the base prediction of each row's first pass
        student_logits = forward_student(student, ids, mask)
    real = mask.bool()  # padding positions' outputs are unspecified
    torch.testing.assert_close(student_logits[real], base_logits[real], **logits_tolerance(base_logits))


def test_make_student_refuses_a_plain_model():
    with pytest.raises(TypeError, match="QuietStarForCausalLM"):
        make_student(tiny_base("llama"))


CHILD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(int(sys.argv[1]))
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tokenizer("think fast")["input_ids"])[None]
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=model.config.eos_token_id)
    torch.save(logits, folder + "/child_logits.pt")
    print(json.dumps({
        "quietstar_imported": any(name.split(".")[0] == "quietstar" for name in sys.modules),
        "class": type(model).__name__,
        "ids": ids[0].tolist(),
        "generated": generated[0].tolist(),
        "tokenizer_size": len(tokenizer),
        "delimiters_left": [t for t in ("<|startthought|>", "<|endthought|>") if t in tokenizer.get_added_vocab()],
    }))
"""


def run_clean_child(folders):
    """Load each folder in a fresh interpreter that never imports quietstar; one JSON report per folder."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = [sys.executable, "-c", CHILD, str(torch.get_num_threads()), *map(str, folders)]
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=folders[0].parent, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.strip().splitlines() if line.startswith("{")]


def test_export_loads_without_quietstar_and_predicts_as_the_student(tmp_path):
    students, folders = [], []
    for table_rows in (257, 300):  # delimiter ids past the table / inside a padded table
        teacher, tokenizer = teacher_with_tokenizer(table_rows)
        assert {START_THOUGHT_TOKEN, END_THOUGHT_TOKEN} <= set(tokenizer.get_added_vocab())
        student = make_student(teacher).train()
        with torch.no_grad():  # move the student off the teacher's base so the comparison is not vacuous
            student.model.layers[0].mlp.down_proj.weight.add_(0.01)
        folder = export_student(student, tmp_path / f"plain{table_rows}", tokenizer)
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "llama" and config["vocab_size"] == table_rows
        students.append(student.eval())
        folders.append(folder)
    for student, folder, child in zip(students, folders, run_clean_child(folders), strict=True):
        assert child["quietstar_imported"] is False
        assert child["class"] == type(student).__name__
        assert child["delimiters_left"] == [] and child["tokenizer_size"] == 257
        ids = torch.tensor(child["ids"])[None]
        with torch.no_grad():
            logits = student(ids).logits
        generated = student.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=student.config.eos_token_id)
        child_logits = torch.load(folder / "child_logits.pt")
        torch.testing.assert_close(child_logits, logits, **logits_tolerance(logits))
        # Greedy ids: same class, weights and thread count; a flip would need a near-tie in random logits.
        assert child["generated"] == generated[0].tolist()


def test_export_refuses_a_thinking_model(tmp_path):
    teacher, tokenizer = teacher_with_tokenizer(257)
    with pytest.raises(TypeError, match="make_student"):
        export_student(teacher, tmp_path / "x", tokenizer)
    with pytest.raises(TypeError, match="make_student"):
        export_student(teacher.base_lm, tmp_path / "y", tokenizer)  # still wrapped: delimiter embedding
