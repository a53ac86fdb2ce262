"""Every console script exits with status 0 after a successful run, tested through its installed entry point
(the wrapper calls ``sys.exit(main())``: a main() that returns its result object exits 1)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from char_tokenizer import char_tokenizer
from quietstar import QuietStarForCausalLM
from tiny_models import tiny_base

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tok = char_tokenizer()
    model = QuietStarForCausalLM.from_base(tiny_base("llama"), tokenizer=tok, n_thought_tokens=2, n_talk_tokens=2, n_passes=1)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _run(script, *args, cwd=None):
    exe = BIN / script
    if not exe.exists():
        exe = shutil.which(script)
    if exe is None:
        pytest.skip(f"{script} is not installed (pip install -e .)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_quietstar_eval_exits_zero(saved_model):
    proc = _run("quietstar-eval", "--model", str(saved_model), "--tasks", "gsm8k", "--limit", "2", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gsm8k" in proc.stdout and "{'gsm8k'" not in proc.stderr


def test_quietstar_inspect_exits_zero(saved_model, tmp_path):
    proc = _run("quietstar-inspect", "--model", str(saved_model), "--text", "12 + 30 = 42.", "--output",
                str(tmp_path / "r.html"), "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "r.html").exists()


def test_quietstar_heldout_exits_zero(saved_model, tmp_path):
    text = tmp_path / "heldout.txt"
    text.write_text("Tom had 7 apples and ate 3; 7 - 3 = 4 left.\n" * 3)
    proc = _run("quietstar-heldout", "--model", str(saved_model), "--file", str(text), "--seq-len", "32", "--seeds", "0",
                "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hardest 10%" in proc.stdout
