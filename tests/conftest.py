"""Test environment: offline hub, Triton interpreter on CPU (set before anything imports triton)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two pytest-xdist workers share the 2 cores of a CI machine: one thread each (no OpenMP contention).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


# Files whose tests launch several processes (torchrun, accelerate, gloo groups on ports). Under
# `pytest -n 2 --dist loadgroup` they share one worker, so no two multi-process runs overlap (two
# concurrent torchrun --standalone jobs on one machine can meet on a port).
MULTI_PROCESS_FILES = {"test_fsdp_cpu.py", "test_resume_world_size.py", "test_training_batch.py",
                       "test_training_config.py", "test_training_precision.py", "test_training_runs.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in MULTI_PROCESS_FILES:
            item.add_marker(pytest.mark.xdist_group("multi_process"))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
