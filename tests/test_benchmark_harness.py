"""benchmarks/harness.py: the one timing loop every benchmark uses counts warm-ups, reports medians
in milliseconds, and alternating rounds interleave the settings."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import harness  # noqa: E402


def test_time_steps_warms_up_then_times_with_prepare_and_sync(monkeypatch):
    clock = iter(range(0, 1000, 1))  # perf_counter advances 1 s per read
    monkeypatch.setattr(harness.time, "perf_counter", lambda: float(next(clock)))
    calls = []
    timing = harness.time_steps(lambda: calls.append("step") or len(calls), steps=3, warmup=2,
                                prepare=lambda: calls.append("prepare"), sync=lambda: calls.append("sync"))
    assert calls.count("step") == 5 and calls.count("prepare") == 5 and calls.count("sync") == 6  # sync timed only
    assert timing.samples_ms == [1000.0, 1000.0, 1000.0] and timing.wall_ms == 1000.0  # seconds -> ms
    assert timing.result == len(calls) - 1  # the last call's result (one sync came after it)


def test_alternating_rounds_interleaves_settings():
    order = []
    times = harness.alternating_rounds({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, rounds=2)
    assert order == ["a", "b"] * 3  # one warm-up round, then two timed rounds
    assert set(times) == {"a", "b"} and all(len(t.samples_ms) == 2 for t in times.values())


def test_model_configs_build_and_unknown_names_fail():
    base = harness.random_base("tiny-llama", hidden_size=32, intermediate_size=64, vocab_size=96)
    assert base.config.hidden_size == 32 and base.config.num_hidden_layers == 2
    with pytest.raises(SystemExit, match="unknown model 'nope'"):
        harness.model_config("nope")


def test_machine_stamp_names_cpu_load_and_versions():
    stamp = harness.machine_stamp(threads=1)
    assert "logical CPUs" in stamp and "load average" in stamp and "torch " in stamp and "transformers " in stamp
