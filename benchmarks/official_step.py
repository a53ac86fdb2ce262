"""Training steps of the OFFICIAL Quiet-STaR code on one of harness.py's Mistral shapes (worker of step_vs_length.py).

The official code (github ezelikman/quiet-star: ``modeling_mistral.py``, ``configuration_mistral.py``)
is not part of this repository and never copied into it. ``benchmarks/gpu_check/official_prepare.sh``
copies the two files out of a fetched checkout into the git-ignored ``gpu_vendor/official/`` and
downloads transformers 4.37.2, tokenizers 0.15.2 and huggingface_hub 0.20.3 as wheels into
``gpu_vendor/wheels/``; ``official_prepare.sh install SITE`` installs them into the folder SITE
(``pip --target``, outside the project's environment: two transformers versions in one site break
both) and drops the official files over its Mistral model. Then::

    python benchmarks/step_vs_length.py --official SITE        # this worker runs with PYTHONPATH=SITE

The official file imports wandb, termcolor, reportlab, pandas, seaborn and matplotlib at import time
(for logging and plots, both off here): :func:`install_stand_ins` registers an empty stand-in for each
one that is not installed, so nothing extra has to travel.

Settings are those of the official ``quiet-star-train.py`` (``model_init``): n_ahead 12 (N = 9),
n_ahead_talk 4, n_passes 2, the same head options, weights in the step's dtype (the official trains
bf16 weights on a GPU); wandb logging off and no kill-after. The model has harness.py's shape
(``tiny-mistral`` or ``smollm2-mistral``) with a byte-level GPT-2 tokenizer padded to the shape's
vocabulary plus the two thought tokens, SDPA attention.

    python benchmarks/official_step.py '{"points": [[1, 256]], "steps": 3, "threads": 1}'

Spec keys: ``points`` [[batch, length], ...] (a third element true marks a memory-ceiling point:
no warm-up, one step, and the first out-of-memory ends the ceiling points), ``steps``, ``threads``,
``model`` (default tiny-mistral), ``dtype`` (float32 | bfloat16; default float32 on a CPU, bfloat16
on a GPU), ``profile`` (print torch.profiler's top kernels of one step at the first point to stderr).
Prints one JSON line per point as it finishes (a stage cut short keeps the finished ones).
"""

import contextlib
import io
import json
import os
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  (stdlib only at import: it runs under the official code's transformers 4.37)

N_AHEAD, N_AHEAD_TALK, N_PASSES = 12, 4, 2  # the official names: N = n_ahead - 3 = 9, K = 4, P = 2
# What the official modeling file imports at module level for logging and plots (never called here).
PLOTTING_MODULES = ("wandb", "termcolor", "reportlab.pdfgen", "reportlab.lib.pagesizes", "reportlab.lib.colors",
                    "pandas", "seaborn", "matplotlib.pyplot", "matplotlib.colors")


class _StandIn(types.ModuleType):
    """A module whose every attribute is a no-op callable (``colored`` returns its text)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return (lambda text="", *a, **k: text) if name == "colored" else (lambda *a, **k: None)


def install_stand_ins(names=PLOTTING_MODULES) -> list[str]:
    """Register a stand-in for every module in ``names`` (and its parents) that does not import."""
    import importlib.machinery

    added = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                sub = ".".join(parts[:i])
                if sub not in sys.modules or isinstance(sys.modules[sub], _StandIn):
                    sys.modules[sub] = module = sys.modules.get(sub) or _StandIn(sub)
                    module.__path__, module.__spec__ = [], importlib.machinery.ModuleSpec(sub, None, is_package=True)
                    if i > 1:
                        setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], module)
            added.append(name)
    return added


def byte_tokenizer(folder: str, vocab_size: int):
    """A byte-level GPT-2 tokenizer of ``vocab_size`` entries (256 bytes, unused fillers, eos last)."""
    from transformers import GPT2Tokenizer
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}  # 256 byte tokens
    vocab.update({f"<unused{i}>": 256 + i for i in range(vocab_size - 257)})
    vocab["<|endoftext|>"] = vocab_size - 1
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    eos = "<|endoftext|>"
    tok = GPT2Tokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                        unk_token=eos, bos_token=eos, eos_token=eos)
    tok.padding_side, tok.pad_token_id = "right", tok.eos_token_id
    return tok


def build(folder: str, model_name: str, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.mistral.configuration_mistral import MistralConfig

    shape = dict(harness.MODEL_CONFIGS[model_name][1])
    shape["vocab_size"] -= 2  # + the 2 thought tokens below, as on our side
    tok = byte_tokenizer(folder, shape["vocab_size"])
    config = MistralConfig(
        **shape, max_thoughts=N_AHEAD + N_AHEAD_TALK + 1, merged_talk_heads=True, merged_lm_and_talk_heads=False,
        merged_lm_and_think_heads=True, use_concat_talk_head=True, use_shallow_think=True, use_shallow_talk=False,
        use_complex_think_head=False, use_complex_talk_head=True, use_weighted_talk_head=True,
    )
    if not hasattr(config, "max_thoughts"):
        raise SystemExit("this transformers is not the official Quiet-STaR one (see the module docstring)")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", torch_dtype=dtype)
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
    return model.to(device).train(), len(tok), shape["vocab_size"]


def main() -> None:
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(f"usage: official_step.py SPEC_JSON\n\n{__doc__}")
        return
    import torch

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.get("threads", 1))
    stand_ins = install_stand_ins()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, spec.get("dtype") or ("bfloat16" if device == "cuda" else "float32"))
    with tempfile.TemporaryDirectory() as folder:
        model, vocab, base_vocab = build(folder, spec.get("model", "tiny-mistral"), dtype, device)
    import transformers

    stamp = dict(vocab=vocab, quietstar_file="official", transformers=transformers.__version__, stand_ins=stand_ins)
    ceiling_failed = False
    for i, (batch, length, *ceiling) in enumerate(spec["points"]):
        ceiling = bool(ceiling and ceiling[0])
        if ceiling and ceiling_failed:
            continue
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, base_vocab - 1, (batch, length), generator=g).to(device)  # never the pad (= eos) id
        mask = torch.ones_like(ids)

        def step():
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.item()

        with contextlib.redirect_stdout(io.StringIO()):  # the official forward prints as it goes
            row = harness.measure_step(step, 1 if ceiling else spec["steps"], warmup=0 if ceiling else 1)
            table = harness.top_kernels_table(step) if spec.get("profile") and i == 0 and not row["oom"] else None
        model.zero_grad(set_to_none=True)
        ceiling_failed |= ceiling and row["oom"]
        row = dict(row, batch=batch, length=length, ceiling=ceiling, loss=row.pop("result", None), **stamp)
        if table:
            print(f"# official, top kernels of one step at B {batch} L {length}:\n{table}", file=sys.stderr, flush=True)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
