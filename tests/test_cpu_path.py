"""The CPU path: `make quick`'s overrides (quick.yaml) and `make repro`'s time estimate."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools import estimate, quick
from pipeline.params import ParamsError, validate

REPO = Path(__file__).resolve().parents[1]


def shipped_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("name", ["quick.yaml", "cpu-hour.yaml"])
def test_cpu_experiments_are_valid_on_the_shipped_params_and_keep_the_seed_process(name):
    overrides = quick.read_overrides(REPO / name)
    params = quick.apply(shipped_params(), overrides, name)
    assert params["data"]["train_subset"] == 0          # the full training set
    assert params["ddpm"] == validate(shipped_params())["ddpm"]  # the seed's schedule, n_T, target
    assert params["ddgm"] == validate(shipped_params())["ddgm"]
    assert params["train"]["epochs"] <= 10
    assert validate(shipped_params())["net"]["kind"] == "cnn"  # params.yaml keeps the seed's CNN


def test_overrides_become_dvc_set_param_flags_that_yaml_reads_back():
    overrides = {"train.epochs": 3, "sweep.steps": [10, 20], "sample.sampler": "ddim",
                 "sample.clip_x0": True, "train.lr": 0.001}
    flags = quick.set_flags(overrides)
    assert flags[::2] == ["-S"] * len(overrides)
    pairs = [flag.split("=", 1) for flag in flags[1::2]]
    assert {key: yaml.safe_load(value) for key, value in pairs} == overrides
    assert all(" " not in flag for flag in flags)  # one argument each, no shell quoting needed


@pytest.mark.parametrize("overrides, message", [
    ({"train.epoch": 3}, "quick.yaml: train.epoch is not a params.yaml key with a single value"),
    ({"train": {"epochs": 3}}, "quick.yaml: train is not a params.yaml key with a single value"),
    ({"train.epochs": 0}, "quick.yaml on params.yaml: train.epochs = 0 is not allowed"),
])
def test_bad_overrides_are_refused_in_one_line(overrides, message):
    with pytest.raises(ParamsError) as error:
        quick.apply(shipped_params(), overrides, "quick.yaml")
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.slow  # subprocess runs
def test_quick_dry_run_prints_the_experiment_command(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "mine.yaml").write_text("train.epochs: 2\nsweep.steps: [10, 20]\n")
    result = subprocess.run([sys.executable, "-m", "tools.quick", "mine.yaml", "--dry"],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dvc exp run -n mine-")
    assert result.stdout.rstrip().endswith("-S train.epochs=2 -S sweep.steps=[10,20]")
    (tmp_path / "mine.yaml").write_text("train.epochs: -2\n")
    result = subprocess.run([sys.executable, "-m", "tools.quick", "mine.yaml", "--dry"],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: mine.yaml on params.yaml: train.epochs = -2")


def test_estimate_counts_the_work_the_params_ask_for():
    params = validate(shipped_params())
    work = estimate.work(params)
    assert work["train"] == (2 * 100 * 469, 2 * 100 * 10000)   # 60000 / 128 -> 469 batches
    assert work["sample"] == (0, 2 * 10000 * 1000)
    assert work["evaluate"] == (0, 2 * 10000 * (1 + 4))
    assert work["sweep"] == (0, 2 * 2 * 2000 * (10 + 20 + 50 + 100 + 1000))
    small = validate(quick.apply(shipped_params(), {"ddpm.n_T": 50, "ddgm.n_T": 50}, "test"))
    assert estimate.work(small)["sweep"] == (0, 2 * 2 * 2000 * (10 + 20 + 50))


@pytest.mark.slow  # a subprocess run
def test_estimate_measures_and_prints_one_total(tmp_path):
    params = shipped_params()
    params["train"]["batch_size"] = params["sample"]["batch_size"] = 16
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "tools.estimate", "--no-wait"], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(REPO)},
                            timeout=300)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first.startswith("estimate: no GPU; on this CPU (") and " takes about " in first
    assert "`make quick`" in second
    (tmp_path / "mine.yaml").write_text("train.epochs: 1\nsweep.steps: [10]\n")
    result = subprocess.run([sys.executable, "-m", "tools.estimate", "--with", "mine.yaml"],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO)}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("estimate: no GPU; on this CPU (")
    assert "`python -m tools.quick mine.yaml` takes about " in result.stdout
    assert len(result.stdout.splitlines()) == 1  # no pause, no pointer to make quick


def test_quick_drops_only_the_no_hash_yet_warnings_of_a_fresh_clone(capfd):
    """`dvc exp run` warns once per output that has no hash before the first run; the rest of
    its stderr, and its exit status, pass through."""
    script = ("import sys; "
              "print(\"WARNING: No file hash info found for '/r/models/ddpm'. It won't be created.\", file=sys.stderr); "
              "print('ERROR: something else', file=sys.stderr); print('stage output'); sys.exit(3)")
    assert quick.run_quietly([sys.executable, "-c", script]) == 3
    out, err = capfd.readouterr()
    assert out == "stage output\n" and err == "ERROR: something else\n"
