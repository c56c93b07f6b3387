"""The speed benchmark runs end to end with tiny settings and reports positive figures; the
quality curve tabulates and draws `benchmarks.quality` files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def quality_run(model: str, net: str, fids: dict[int, float]) -> dict:
    """A ``benchmarks.quality --json`` file's content: one EMA row per epoch, one raw row."""
    row = {"weights": "ema0.999", "sampler": "ancestral", "steps": 100, "clip_x0": True,
           "prior": "exact", "kid_mean": 1.0, "precision": 0.5, "recall": 0.4,
           "class_tv": 0.2, "heldout_loss": 0.03}
    rows = [{**row, "epoch": epoch, "fid": fid, "train_seconds": 60.0 * epoch}
            for epoch, fid in fids.items()]
    rows.append({**rows[-1], "weights": "raw", "fid": 999.0})
    return {"model": model, "overrides": {"net.kind": net, "train.holdout_subset": 2000},
            "n_samples": 2000, "floor": {"fid": 6.5, "kid_mean": 0.0, "precision": 0.9,
                                         "recall": 0.9, "class_tv": 0.05}, "rows": rows}


def test_curve_tabulates_every_ema_row_and_draws_the_figure(tmp_path):
    paths = []
    for model, net, fids in [("ddpm", "cnn", {6: 300.0, 10: 250.5}), ("ddgm", "unet", {1: 400.0})]:
        paths.append(tmp_path / f"{model}.json")
        paths[-1].write_text(json.dumps(quality_run(model, net, fids)))
    out, table = tmp_path / "fig.png", tmp_path / "table.md"
    subprocess.run([sys.executable, "-m", "benchmarks.curve", *map(str, paths), "--out", str(out),
                    "--x", "train_seconds",
                    "--table", str(table)], check=True, cwd=REPO, capture_output=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = table.read_text().splitlines()
    assert [line.split(" | ")[:4] for line in lines[2:4]] == [
        ["| ddpm, cnn", "6", "ancestral 100, x0 clipped", "300.0"],
        ["| ddpm, cnn", "10", "ancestral 100, x0 clipped", "250.5"]]
    assert lines[5].startswith("| ddgm, unet | 1 |")
    assert "999.0" not in table.read_text()              # the raw weights are not plotted
    assert sum(line.startswith("| floor") for line in lines) == 2


def test_curve_names_each_ema_of_a_run_with_several_and_keeps_one_on_request(tmp_path):
    run = quality_run("ddpm", "unet", {1: 130.0, 2: 70.0})
    run["rows"] += [{**row, "weights": "ema0.999:20", "fid": row["fid"] - 5} for row in run["rows"]
                    if row["weights"] == "ema0.999"]
    path, table = tmp_path / "run.json", tmp_path / "table.md"
    path.write_text(json.dumps(run))

    def rows(*extra: str) -> list[list[str]]:
        subprocess.run([sys.executable, "-m", "benchmarks.curve", str(path), "--out",
                        str(tmp_path / "fig.png"), "--table", str(table), *extra],
                       check=True, cwd=REPO, capture_output=True)
        return [line.split(" | ")[1:4] for line in table.read_text().splitlines()[2:-1]]

    assert rows() == [["1", "ancestral 100, x0 clipped, ema0.999", "130.0"],
                      ["1", "ancestral 100, x0 clipped, ema0.999:20", "125.0"],
                      ["2", "ancestral 100, x0 clipped, ema0.999", "70.0"],
                      ["2", "ancestral 100, x0 clipped, ema0.999:20", "65.0"]]
    assert rows("--weights", "ema0.999:20") == [["1", "ancestral 100, x0 clipped", "125.0"],
                                                 ["2", "ancestral 100, x0 clipped", "65.0"]]
    assert table.read_text().splitlines()[2].startswith("| ddpm, unet | 1 |")
    rows("--names", "file")
    assert table.read_text().splitlines()[2].startswith("| ddpm, run | 1 |")
    result = subprocess.run([sys.executable, "-m", "benchmarks.curve", str(path), "--out",
                             str(tmp_path / "other.png"), "--weights", "ema0.99"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and not (tmp_path / "other.png").exists()
    assert "has no rows of --weights ema0.99; it has ema0.999, ema0.999:20" in result.stderr


def test_curve_refuses_a_file_that_is_not_a_quality_run(tmp_path):
    path = tmp_path / "speed.json"
    path.write_text(json.dumps({"rows": []}))
    result = subprocess.run([sys.executable, "-m", "benchmarks.curve", str(path), "--out",
                             str(tmp_path / "fig.png")], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "is not a benchmarks.quality training run" in result.stderr
    assert not (tmp_path / "fig.png").exists()


@pytest.mark.parametrize("text, expected", [
    ("ancestral:100", ("ancestral", 100, False, "exact", 0.0)),
    ("ddim:50:clip:unit", ("ddim", 50, True, "unit", 0.0)),
    ("ddim:100:clip:eta=1", ("ddim", 100, True, "exact", 1.0)),
    ("ddim:20:eta=0.5", ("ddim", 20, False, "exact", 0.5)),
])
def test_sampler_option_reads_steps_flags_and_eta(text, expected):
    from benchmarks.quality import sampler_option

    assert tuple(sampler_option(text)) == expected


@pytest.mark.parametrize("text", ["ancestral:100:eta=1", "ddim:10:eta=2", "ddim:10:eta=x",
                                  "ddim:10:eta=0:eta=1", "ddim:0", "ddim:10:fast", "euler:10"])
def test_sampler_option_refuses_what_it_cannot_run(text):
    import argparse

    from benchmarks.quality import sampler_option

    with pytest.raises(argparse.ArgumentTypeError, match="is not allowed"):
        sampler_option(text)


def test_network_benchmark_counts_flops_and_rates_for_every_network(tmp_path, monkeypatch):
    from benchmarks import networks

    monkeypatch.setattr(networks, "NETWORKS", {"cnn": networks.CNN,
                                               "unet3": networks.unet([8, 16, 16], True)})
    results = networks.main(["--device", "cpu", "--batch-size", "4", "--eval-batch", "4", "6",
                             "--repeats", "1", "--calls", "1", "--json", str(tmp_path / "n.json")])
    rows = {row["network"]: row for row in results["rows"]}
    assert set(rows) == {"cnn", "unet3"}
    # The seed's CNN: 0.475 GFLOP per image for forward + backward, whatever the batch.
    assert rows["cnn"]["gflop_per_image"] == pytest.approx(0.475, abs=0.001)
    assert rows["cnn"]["parameters_m"] == pytest.approx(0.29, abs=0.01)
    for row in rows.values():
        assert row["train_images_per_s"] > 0
        assert set(row["eval_images_per_s"]) == {"4", "6"}  # one rate per sampling batch
        assert min(row["eval_images_per_s"].values()) > 0
        assert row["gflop_per_s"] == pytest.approx(row["gflop_per_image"] * row["train_images_per_s"])
    assert (tmp_path / "n.json").is_file()
    only = networks.main(["--device", "cpu", "--batch-size", "2", "--eval-batch", "2",
                          "--repeats", "1", "--calls", "1", "--only", "unet"])
    assert [row["network"] for row in only["rows"]] == ["unet3"]


@pytest.mark.parametrize("args, message", [
    (["--only", "transformer"], "--only 'transformer' matches no network"),
    (["--eval-batch", "128", "0"], "--eval-batch = 0 is not allowed"),
])
def test_network_benchmark_refuses_what_it_cannot_run(args, message, capsys):
    from benchmarks import networks

    with pytest.raises(SystemExit) as exit_info:
        networks.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def benchmark_folder(root: Path, folders: tuple[str, ...]) -> None:
    """What a benchmark reads in its working folder: the code, synthetic MNIST in data/ and an
    (untrained) classifier file where the classifier stage writes it."""
    from diffusion.classifier import _build_model, save_classifier

    for folder in folders:
        (root / folder).symlink_to(REPO / folder)
    write_synthetic_mnist(root / "data" / "MNIST" / "raw")
    save_classifier(_build_model(0), root / "models" / "classifier" / "classifier.pt")


def test_quality_benchmark_refuses_an_empty_batch(monkeypatch, capsys):
    from benchmarks import quality

    monkeypatch.setattr(sys, "argv", ["quality", "--from", "model.pt", "--json", "out.json",
                                      "--batch-size", "0"])
    with pytest.raises(SystemExit) as exit_info:
        quality.main()
    assert exit_info.value.code == 2
    assert "--batch-size = 0 is not allowed: must be >= 1" in capsys.readouterr().err


@pytest.mark.slow  # subprocess runs
def test_quality_benchmark_scores_model_files_and_names_grids_by_their_model(tmp_path):
    """--from scores a pipeline model file (always named model.pt) with each sampler, eta
    included; two models' grids get two names, not one overwritten file."""
    from diffusion.model import save_model
    from diffusion.network import make_network
    from diffusion.process import make_process

    benchmark_folder(tmp_path, ("diffusion", "pipeline", "benchmarks"))
    net_config = {"kind": "cnn", "hidden": [8], "activation": "gelu"}
    noises = {"ddpm": {"noise": "gaussian"}, "ddgm": {"noise": "gamma", "theta_0": 0.001}}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    for model, noise in noises.items():
        net = make_network(net_config)
        save_model(tmp_path / "models" / model / "model.pt", net, net,
                   make_process({**noise, "betas": [1e-4, 0.02], "n_T": 10}),
                   {"model": model, "net": net_config, "seed": 0, "epochs_trained": 1})
        result = subprocess.run(
            [sys.executable, "-m", "benchmarks.quality", "--from", f"models/{model}/model.pt",
             "--sampler", "ddim:3:eta=1", "--sampler", "ancestral:3:clip", "--n-samples", "8",
             "--json", f"{model}.json", "--grids", "grids", "--batch-size", "3"],  # 3 + 3 + 2
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        rows = json.loads((tmp_path / f"{model}.json").read_text())["rows"]
        assert [(row["sampler"], row.get("eta", 0.0)) for row in rows] == [("ddim", 1.0),
                                                                            ("ancestral", 0.0)]
        assert all(row["fid"] > 0 and row["epoch"] == 1 for row in rows)
    assert sorted(path.name for path in (tmp_path / "grids").iterdir()) == [
        f"{model}_e1_{label}.png" for model in ("ddgm", "ddpm")
        for label in ("ancestral3_clip", "ddim3_eta1")]


@pytest.mark.slow  # a subprocess run
def test_guidance_benchmark_scores_every_weight_and_draws_a_row_per_digit(tmp_path):
    """benchmarks.guidance trains a tiny conditional model, then reports each w's conditional
    accuracy and FID and writes a 10 x 10 grid per w; an unconditional setting is refused."""
    import torch
    from PIL import Image

    benchmark_folder(tmp_path, ("diffusion", "pipeline", "stages", "benchmarks", "tools"))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    tiny = ["-S", "data.train_subset=64", "-S", "train.batch_size=32", "-S", "train.holdout_subset=32",
            "-S", "ddgm.n_T=10"]
    command = [sys.executable, "-m", "benchmarks.guidance", "--model", "ddgm", "--epochs", "1",
               *tiny, "--guidance", "0,2", "--sampler", "ddim:3", "--n-samples", "20",
               "--json", "out.json", "--grids", "grids"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    refused = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "add -S net.classes=10" in refused.stderr
    result = subprocess.run([*command, "-S", "net.classes=10"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert [row["guidance"] for row in out["rows"]] == [0.0, 2.0]
    for row in out["rows"]:
        assert 0 <= row["conditional_accuracy"] <= 1 and row["fid"] > 0
        assert f"w = {row['guidance']:g}: conditional accuracy {row['conditional_accuracy']:.3f}" in result.stdout
    assert out["overrides"]["net.classes"] == 10 and out["epochs"] == 1
    for weight in ("0", "2"):
        grid = Image.open(tmp_path / "grids" / f"ddgm_w{weight}.png")
        assert grid.size == (10 * 28 + 11 * 2, 10 * 28 + 11 * 2)  # 10 x 10 digits, 2-pixel gaps
    assert torch.__version__ == out["torch"]
