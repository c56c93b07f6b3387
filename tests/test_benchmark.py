"""The speed benchmark runs end to end with tiny settings and reports positive figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, write_synthetic_mnist


@pytest.mark.slow  # a subprocess run
def test_benchmark_writes_json_with_positive_figures(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_synthetic_mnist(raw)
    out = tmp_path / "speed.json"
    command = [sys.executable, "-m", "benchmarks.speed", "--device", "cpu", "--steps", "2",
               "--batch-size", "16", "--repeats", "1", "--sample-n", "4", "--sample-steps", "3",
               "--data", str(raw), "--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train images/s" in result.stdout and "sampling evals/s" in result.stdout

    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["torch"] == __import__("torch").__version__
    assert results["command"].startswith("python -m benchmarks.speed --device cpu --steps 2")
    assert results["settings"] == {"steps": 2, "batch_size": 16, "repeats": 1, "sample_n": 4,
                                   "sample_steps": 3, "seed": 0, "precision": "auto"}
    assert results["precision"] in ("bf16", "fp32")  # "auto" resolved for this CPU
    for unit in ("train_images_per_s", "sampling_evals_per_s"):
        row = results[unit]
        assert row["ours"] > 0 and row["reference"] > 0
        assert abs(row["ratio"] - row["runs"]["ours"][0] / row["runs"]["reference"][0]) < 1e-9
        assert len(row["runs"]["ours"]) == len(row["runs"]["reference"]) == 1


@pytest.mark.slow  # a subprocess run
def test_benchmark_refuses_more_steps_than_images(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_synthetic_mnist(raw, n_train=32)
    command = [sys.executable, "-m", "benchmarks.speed", "--device", "cpu", "--steps", "3",
               "--batch-size", "16", "--data", str(raw)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "more than the 32 training images" in result.stderr
