"""What every benchmark shares: one timing loop, the machine stamp, the tiny-model configs, units.

Units everywhere: time in milliseconds (ms), memory in MiB (2**20 bytes). Timings are medians: the
machines are shared, and a median ignores the odd descheduled call.

Importing this module needs only the standard library (``official_step.py`` runs it under the
official code's old transformers); torch and transformers are imported inside the functions.
Scripts import it as a sibling: ``sys.path`` gets the script's folder, so each does
``sys.path.insert(0, <benchmarks folder>)`` first (the gpu_check stages run through run_stub.py).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)
if REPO not in sys.path:  # appended: a PYTHONPATH (another checkout, a stub package) still wins
    sys.path.append(REPO)

MIB = 2**20


# ---------------------------------------------------------------- timing

@dataclass
class Timing:
    """Median wall and process-CPU milliseconds of the timed calls, and the last call's result."""

    wall_ms: float
    cpu_ms: float
    result: object = None
    samples_ms: list[float] = field(default_factory=list)


def process_cpu_seconds() -> float:
    """CPU time of this process, all threads: on a shared machine steadier than the wall clock."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_steps(step, steps: int, warmup: int = 1, prepare=None, sync=None) -> Timing:
    """``warmup`` untimed calls of ``step``, then ``steps`` timed ones.

    ``prepare()`` runs untimed before every call (e.g. free the gradients); ``sync()`` runs inside the
    timed span, before and after the call (``torch.cuda.synchronize``, a process barrier)."""
    for _ in range(warmup):
        if prepare:
            prepare()
        step()
    walls, cpus, result = [], [], None
    for _ in range(steps):
        if prepare:
            prepare()
        if sync:
            sync()
        t0, c0 = time.perf_counter(), process_cpu_seconds()
        result = step()
        if sync:
            sync()
        walls.append(1e3 * (time.perf_counter() - t0))
        cpus.append(1e3 * (process_cpu_seconds() - c0))
    if not walls:
        return Timing(float("nan"), float("nan"), result)
    return Timing(statistics.median(walls), statistics.median(cpus), result, walls)


def alternating_rounds(settings: dict, rounds: int, warmup: int = 1) -> dict[str, Timing]:
    """Time every ``settings[name]()`` (a callable that switches to its setting and runs one step)
    in alternating rounds inside one process, so a change of machine load hits all of them alike."""
    for _ in range(warmup):
        for run in settings.values():
            run()
    samples = {name: [] for name in settings}
    for _ in range(rounds):
        for name, run in settings.items():
            samples[name].append(time_steps(run, 1, warmup=0).wall_ms)
    return {name: Timing(statistics.median(ms), float("nan"), None, ms) for name, ms in samples.items()}


def cuda_sync():
    """``sync`` for ``time_steps`` when CUDA is present (None otherwise: nothing to wait for)."""
    import torch

    return torch.cuda.synchronize if torch.cuda.is_available() else None


# ---------------------------------------------------------------- memory (MiB)

def peak_rss_mib() -> float:
    """The process's peak resident set so far (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """The process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def cuda_peak_mib(since_bytes: int = 0) -> float:
    import torch

    return (torch.cuda.max_memory_allocated() - since_bytes) / MIB


def measure_step(step, steps: int, warmup: int = 1) -> dict:
    """``time_steps`` on whatever device the step runs, as one result row: ``step_ms`` (median),
    ``peak_mib`` (CUDA: ``max_memory_allocated`` over the timed steps; CPU: the process's peak RSS, a
    fresh process's own only) and ``result``; or ``oom: True`` where CUDA ran out of memory."""
    import torch

    cuda = torch.cuda.is_available()
    prepare = torch.cuda.reset_peak_memory_stats if cuda else None
    try:
        timing = time_steps(step, steps, warmup=warmup, sync=cuda_sync(), prepare=prepare)
    except torch.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return dict(oom=True, error=str(err).splitlines()[0][:160])
    peak = cuda_peak_mib() if cuda else peak_rss_mib()
    return dict(oom=False, step_ms=timing.wall_ms, peak_mib=peak, result=timing.result)


def top_kernels_table(step, rows: int = 15) -> str:
    """One profiled call of ``step`` (after the caller's warm-up): torch.profiler's table of the
    ``rows`` most expensive kernels (CUDA time on a GPU, CPU time otherwise)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


# ---------------------------------------------------------------- machine stamp

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def load_average() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine_stamp(threads: int | None = None) -> str:
    """One line: CPU model and cores, load average (1/5/15 min), GPU, torch and transformers versions."""
    import torch

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "-"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    threads = f", {threads} torch thread(s)" if threads else ""
    return (f"Machine: {cpu_model()}, {os.cpu_count()} logical CPUs{threads}, load average {load_average()}; "
            f"{gpu}; torch {torch.__version__}, transformers {tf}")


# ---------------------------------------------------------------- tiny-model configs

# name: (transformers config class, keyword arguments). Random weights everywhere: time and memory
# do not depend on them, and GPU machines have no network.
MODEL_CONFIGS = {
    # The 256-wide Mistral of the step-vs-length table (and of official_step.py, same shape).
    "tiny-mistral": ("MistralConfig", dict(vocab_size=514, hidden_size=256, intermediate_size=1024,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                           max_position_embeddings=4096, sliding_window=None)),
    # A 2-layer Llama; head dim = hidden / 4 (hidden 512: head dim 128, the GPU kernels' main case).
    "tiny-llama": ("LlamaConfig", dict(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)),
    # A 4-layer Llama big enough for sharded model state to show against a Python process's ~600 MB.
    "wide-llama": ("LlamaConfig", dict(vocab_size=257, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                       tie_word_embeddings=True, bos_token_id=256, eos_token_id=256)),
    "smollm2-shape": ("LlamaConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                          rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)),
    # SmolLM2-135M's size as a Mistral, the one architecture the official Quiet-STaR code runs (side by side).
    "smollm2-mistral": ("MistralConfig", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=65536,
                                              rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                              sliding_window=None)),
    "mistral-7b-shape": ("MistralConfig", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                               max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                                               sliding_window=4096, tie_word_embeddings=False)),
}


def model_config(name: str, **overrides):
    import transformers

    if name not in MODEL_CONFIGS:
        raise SystemExit(f"unknown model {name!r}; choose one of {', '.join(MODEL_CONFIGS)}")
    cls, kwargs = MODEL_CONFIGS[name]
    return getattr(transformers, cls)(**{**kwargs, **overrides})


def random_base(name: str, seed: int = 0, attn_implementation: str | None = None, dtype=None, **overrides):
    """A base causal LM of config ``name`` (``overrides`` change its fields) with seeded random weights."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    extra = {k: v for k, v in (("attn_implementation", attn_implementation), ("dtype", dtype)) if v is not None}
    return AutoModelForCausalLM.from_config(model_config(name, **overrides), **extra)


# ---------------------------------------------------------------- fresh processes

def in_fresh_processes(target, jobs: list[tuple], label) -> list[dict]:
    """Run ``target(*job, queue)`` for every job at once, each in a fresh (spawned) process, so peak
    memory is that job's alone; returns the dict each put on its queue, in order. ``label(job)``
    names a job in the error when its process fails."""
    ctx = mp.get_context("spawn")
    started = []
    for job in jobs:
        queue = ctx.Queue()
        proc = ctx.Process(target=target, args=(*job, queue))
        proc.start()
        started.append((job, proc, queue))
    results = []
    for job, proc, queue in started:
        proc.join()  # a small dict: it fits the queue's pipe, so joining first is safe
        if proc.exitcode != 0:
            raise SystemExit(f"{label(job)} failed (exit code {proc.exitcode}); its traceback is above")
        results.append(queue.get(timeout=10))
    return results


def in_fresh_process(target, job: tuple, label: str) -> dict:
    return in_fresh_processes(target, [job], lambda _: label)[0]


def add_step_arguments(parser, models: str, threads_help: str = "torch threads per process") -> None:
    """The arguments of a script that times Quiet-STaR training steps of named model shapes."""
    parser.add_argument("--models", default=models, help="comma-separated model shapes")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="sequences per process")
    parser.add_argument("--n-thought", type=int, default=4, help="N")
    parser.add_argument("--n-talk", type=int, default=4, help="K")
    parser.add_argument("--passes", type=int, default=2, help="P")
    parser.add_argument("--attn", default="quietstar_torch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help=threads_help)
