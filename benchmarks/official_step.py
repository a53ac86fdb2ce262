"""One training step of the OFFICIAL Quiet-STaR code on harness.py's tiny Mistral (worker of step_vs_length.py).

The official code (github ezelikman/quiet-star: ``modeling_mistral.py``, ``configuration_mistral.py``)
is not part of this repository and never copied into it. To run it, install transformers 4.37 into a
folder outside the repository and drop the two official files over its Mistral model, as the official
README says, e.g.::

    pip install --no-deps --target /tmp/official-deps transformers==4.37.2 tokenizers==0.15.2 huggingface_hub==0.20.3
    cp modeling_mistral.py configuration_mistral.py /tmp/official-deps/transformers/models/mistral/
    # the official file imports wandb, seaborn, termcolor and reportlab at import time (only for logging
    # and plots, both off here): empty stand-ins on the path are enough
    python benchmarks/step_vs_length.py --official /tmp/official-deps:/tmp/official-stubs

Settings are those of the official ``quiet-star-train.py`` (``model_init``): n_ahead 12 (N = 9),
n_ahead_talk 4, n_passes 2, the same head options; wandb logging off and no kill-after. The model has
the same shape as ours (harness.py's ``tiny-mistral``: hidden 256, 2 layers, 4 heads) with a 512-token byte-level
GPT-2 tokenizer plus the two thought tokens (vocab 514), SDPA attention, fp32, batch 1.

    python benchmarks/official_step.py '{"length": 256, "steps": 3, "threads": 1}'   # prints one JSON line
"""

import contextlib
import io
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (stdlib only at import: it runs under the official code's transformers 4.37)

N_AHEAD, N_AHEAD_TALK, N_PASSES = 12, 4, 2  # the official names: N = n_ahead - 3 = 9, K = 4, P = 2


def byte_tokenizer(folder: str):
    from transformers import GPT2Tokenizer
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}  # 256 byte tokens
    vocab.update({f"<unused{i}>": 256 + i for i in range(255)})
    vocab["<|endoftext|>"] = 511
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    eos = "<|endoftext|>"
    tok = GPT2Tokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                        unk_token=eos, bos_token=eos, eos_token=eos)
    tok.padding_side, tok.pad_token_id = "right", tok.eos_token_id
    return tok


def build(folder: str):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.mistral.configuration_mistral import MistralConfig

    tok = byte_tokenizer(folder)
    shape = {**harness.MODEL_CONFIGS["tiny-mistral"][1], "vocab_size": 512}  # + the 2 thought tokens below
    config = MistralConfig(
        **shape, max_thoughts=N_AHEAD + N_AHEAD_TALK + 1, merged_talk_heads=True, merged_lm_and_talk_heads=False,
        merged_lm_and_think_heads=True, use_concat_talk_head=True, use_shallow_think=True, use_shallow_talk=False,
        use_complex_think_head=False, use_complex_talk_head=True, use_weighted_talk_head=True,
    )
    if not hasattr(config, "max_thoughts"):
        raise SystemExit("this transformers is not the official Quiet-STaR one (see the module docstring)")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    tok.add_special_tokens({"additional_special_tokens": ["<|startthought|>", "<|endthought|>"]})
    model.resize_token_embeddings(len(tok))
    # As the official quiet-star-train.py's model_init sets them (logging off, never killed).
    model.tokenizer = tok
    model.gumbel_detach, model.include_policy_loss = True, True
    model.use_start_thought_token, model.use_end_thought_token = True, True
    model.n_ahead, model.n_ahead_talk, model.n_passes = N_AHEAD, N_AHEAD_TALK, N_PASSES
    model.n_tokens_print, model.gradient_accumulation_steps = 2, 2
    model.residual_think_head, model.optimize_lm_head_only_at_start = False, False
    model.gumbel_temperature, model.wandb_enabled, model.original_mode = 1, False, False
    model.config_params, model.run_start, model.kill_after = {}, int(time.time()), None
    return model.train(), len(tok)


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(f"usage: official_step.py SPEC_JSON\n\n{__doc__}")
        return
    import torch

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory() as folder:
        model, vocab = build(folder)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (1, spec["length"]), generator=g)
    mask = torch.ones_like(ids)

    def step():
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    with contextlib.redirect_stdout(io.StringIO()):  # the official forward prints as it goes
        timing = harness.time_steps(step, spec["steps"])
    import transformers

    print(json.dumps(dict(step_ms=timing.wall_ms, peak_mib=harness.peak_rss_mib(), loss=timing.result, vocab=vocab,
                          quietstar_file="official", transformers=transformers.__version__)))


if __name__ == "__main__":
    main()
