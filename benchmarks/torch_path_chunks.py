"""quietstar_torch's chunked path on a GPU: the replay's forward + backward at several score-chunk budgets.

    python benchmarks/torch_path_chunks.py [--budgets 21,24,26] [--L 1024]

The chunked decomposition (quietstar/ops/torch_path.py) computes the base part in chunks of query
positions holding at most ``2**b`` fp32 scores. On CPU it runs only with the CPU flash path off,
where 2**21 measured best (issue 10); this script measures the GPU side. Model and step: the tiny
Llama of benchmarks/gpu_check/model_step.py at head dim 128 (hidden 512, 2 layers), bf16, B 2,
P 2, N 8, K 4, given thoughts, forward + backward of the whole model; the budgets alternate inside
one process (median of 5 rounds).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import quietstar.ops.torch_path as torch_path
from quietstar import QuietStarForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="21,24,26", help="log2 of the score elements per chunk")
    parser.add_argument("--L", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch_path.USE_CPU_FLASH = False  # measure the chunked path on CPU too
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192))
    model = QuietStarForCausalLM.from_base(base, n_thought_tokens=8, n_talk_tokens=4, n_passes=2,
                                           attn_implementation="quietstar_torch").to(device, dtype).train()
    ids = torch.randint(0, 510, (2, args.L), device=device)
    thoughts = torch.randint(0, 510, (4, args.L, 8), device=device)

    def step():
        loss = model(ids, labels=ids, thought_ids=thoughts, return_logits=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    budgets = [int(b) for b in args.budgets.split(",")]
    times = {b: [] for b in budgets}
    for round_ in range(args.rounds + 1):
        for b in budgets:
            torch_path._CHUNK_SCORE_ELEMENTS = torch_path._CHUNK_SCORE_ELEMENTS_ACCELERATOR = 1 << b
            t0 = time.perf_counter()
            step()
            if round_:  # round 0 warms up
                times[b].append(time.perf_counter() - t0)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"Machine: {name}; torch {torch.__version__}; {dtype}; L {args.L}; quietstar_torch chunked\n")
    print("| score elements per chunk | replay fwd+bwd ms (median) | vs 2^21 |")
    print("|---|---|---|")
    first = statistics.median(times[budgets[0]])
    for b in budgets:
        median = statistics.median(times[b])
        print(f"| 2^{b} | {1e3 * median:.1f} | {first / median:.2f}x |")


if __name__ == "__main__":
    main()
