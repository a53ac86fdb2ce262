"""The memory of train/configs/mistral7b_lora.yaml's step, measured: Mistral-7B's shape, random bf16 weights.

    python benchmarks/gpu_check/lora_7b_memory.py [--shapes 4x256,4x512] [--tiny]

The model the recipe trains (LoRA r 16 on every linear layer, gradient checkpointing, bf16 weights
under bf16 autocast, quietstar_triton, N 9 K 4 P 2, the memory-light forward), built from
Mistral-7B-v0.1's config with random weights (memory and time do not depend on them; the GPU has no
network). For each batch x length: one warm-up step and one timed step (forward + backward + AdamW
on the trainable tensors); prints the weights' memory, the peak allocated during the timed step and
the step time. ``--tiny`` shrinks the model so the script's logic runs on a CPU.
"""

from __future__ import annotations

import argparse
import time

import peft
import torch
from transformers import AutoModelForCausalLM, MistralConfig

from quietstar import QuietStarForCausalLM


def mistral_7b_config(tiny: bool) -> MistralConfig:
    if tiny:
        return MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    return MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4x256", help="comma-separated BATCHxLENGTH (the recipe: 4x256)")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    attn = "quietstar_triton" if cuda else "quietstar_torch"
    torch.manual_seed(0)
    with device:
        base = AutoModelForCausalLM.from_config(mistral_7b_config(args.tiny), dtype=torch.bfloat16)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    model = QuietStarForCausalLM.from_base(base, n_thought_tokens=9, n_talk_tokens=4, n_passes=2,
                                           embedding_scale=1.0, attn_implementation=attn, lora=lora)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=cuda)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"Machine: {name}; torch {torch.__version__}; Mistral-7B shape{' (TINY)' if args.tiny else ''}, random bf16 "
          f"weights {weights_gib:.1f} GiB, trainable {sum(p.numel() for p in trainable) / 1e6:.1f}M; {attn}, "
          "LoRA r 16 all-linear, gradient checkpointing, bf16 autocast, N 9 K 4 P 2, memory-light forward\n")
    print("| batch x L | rows x tokens in the replay | peak allocated GiB | above weights GiB | step s |")
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

        try:
            step()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
        except torch.OutOfMemoryError as err:
            print(f"| {B} x {L} | out of memory: {str(err).splitlines()[0][:120]} | | | |", flush=True)
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
            continue
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        tokens = B * 2 * (1 + 14) * L
        print(f"| {B} x {L} | {B * 2} x {tokens // (B * 2)} | {peak:.1f} | {peak - weights_gib:.1f} | {seconds:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
