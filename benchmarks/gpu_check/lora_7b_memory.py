"""The memory of train/configs/mistral7b_lora.yaml's step, measured: Mistral-7B's shape, random bf16 weights.

    python benchmarks/gpu_check/lora_7b_memory.py [--shapes 4x256,4x512] [--tiny]

The model the recipe trains (LoRA r 16 on every linear layer, gradient checkpointing, bf16 weights
under bf16 autocast, quietstar_triton, N 9 K 4 P 2, the memory-light forward), built from
Mistral-7B-v0.1's config with random weights (memory and time do not depend on them; the GPU has no
network). For each batch x length: one warm-up step and one timed step (forward + backward + AdamW
on the trainable tensors); prints the weights' memory, the peak allocated during the timed step (MiB)
and the step time (ms). ``--tiny`` shrinks the model so the script's logic runs on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import peft
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

from quietstar import QuietStarForCausalLM  # noqa: E402

# --tiny: the same architecture, small enough for a CPU
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4x256", help="comma-separated BATCHxLENGTH (the recipe: 4x256)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    attn = "quietstar_triton" if cuda else "quietstar_torch"
    with device:
        base = harness.random_base("mistral-7b-shape", dtype=torch.bfloat16, **(TINY if args.tiny else {}))
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    model = QuietStarForCausalLM.from_base(base, n_thought_tokens=9, n_talk_tokens=4, n_passes=2,
                                           embedding_scale=1.0, attn_implementation=attn, lora=lora)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=cuda)
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / harness.MIB
    print(f"{harness.machine_stamp()}\nMistral-7B shape{' (TINY)' if args.tiny else ''}, random bf16 "
          f"weights {weights_mib:.0f} MiB, trainable {sum(p.numel() for p in trainable) / 1e6:.1f}M; {attn}, "
          "LoRA r 16 all-linear, gradient checkpointing, bf16 autocast, N 9 K 4 P 2, memory-light forward\n")
    print("| batch x L | rows x tokens in the replay | peak allocated MiB | above weights MiB | step ms |")
    print("|---|---|---|---|---|")
    vocab = model.get_input_embeddings().num_embeddings - 2
    for shape in args.shapes.split(","):
        B, L = (int(x) for x in shape.split("x"))
        ids = torch.randint(0, vocab, (B, L), device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

        def step():
            with autocast:
                loss = model(ids, labels=ids, return_logits=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:  # one warm-up step, then one timed step; the peak is the timed step's
            timing = harness.time_steps(step, 1, warmup=1, sync=harness.cuda_sync(),
                                        prepare=torch.cuda.reset_peak_memory_stats if cuda else None)
        except torch.OutOfMemoryError as err:
            print(f"| {B} x {L} | out of memory: {str(err).splitlines()[0][:120]} | | | |", flush=True)
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
            continue
        peak = harness.cuda_peak_mib() if cuda else float("nan")
        tokens = B * 2 * (1 + 14) * L
        print(f"| {B} x {L} | {B * 2} x {tokens // (B * 2)} | {peak:.0f} | {peak - weights_mib:.0f} | {timing.wall_ms:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
