"""End to end: the real `dvc repro` on real MNIST with tiny params, in a scratch git repo.

One scratch repo is shared by the tests of this module (module-scoped fixture), in order:
the first repro and its outputs, MLflow's record of it, a second repro that runs nothing,
and a change of ddgm.theta_0 that re-runs only what depends on it.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.tracking import file_digest
from tests.helpers import TINY_PARAMS, make_scratch_repo, stage_env

STAGES = ["download", "classifier", "train@ddpm", "train@ddgm", "sample@ddpm", "sample@ddgm",
          "evaluate@ddpm", "evaluate@ddgm", "sweep", "plot"]

pytestmark = pytest.mark.slow  # real `dvc repro` runs


def dvc(root: Path, *args: str) -> str:
    # System metrics sampled every second, so the tiny stages' runs get some.
    env = {**stage_env(), "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    result = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, mnist_raw_dir):
    root = make_scratch_repo(tmp_path_factory.mktemp("pipeline"), mnist_dir=mnist_raw_dir)
    output = dvc(root, "repro")
    return root, output


def test_stage_list_is_the_documented_one(pipeline):
    root, _ = pipeline
    listed = [line.split()[0] for line in dvc(root, "stage", "list").splitlines() if line.strip()]
    assert listed == STAGES


def test_first_repro_runs_every_stage_and_writes_every_output(pipeline):
    root, output = pipeline
    assert stages_run(output) == set(STAGES)
    for model in ("ddpm", "ddgm"):
        assert (root / "models" / model / "model.pt").is_file()
        rows = list(csv.DictReader((root / "results/train" / model / "log.csv").open()))
        assert [int(r["epoch"]) for r in rows] == [1]
        assert all(float(r["train_loss"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
        assert (root / "results/train" / model / "grids" / "epoch_001.png").is_file()
        samples = np.load(root / "results/sample" / model / "samples.npy")
        assert samples.shape == (TINY_PARAMS["sample"]["n_samples"], 28, 28)
        assert samples.dtype == np.uint8
        metrics = json.loads((root / "results/evaluate" / model / "metrics.json").read_text())
        detail = json.loads((root / "results/evaluate" / model / "detail.json").read_text())
        assert metrics["n_samples"] == TINY_PARAMS["evaluate"]["n_samples"]
        assert 0 < metrics["heldout_loss"] < 2
        # psnr_t holds fractions of n_T = 10: t = 2, 5, 9.
        assert all(f"psnr_t{t}" in detail for t in (2, 5, 9))
        # A less noisy input gives a better one-step estimate of x0.
        assert detail["psnr_t2"] > detail["psnr_t9"]
        for group in ("quality", "floor"):
            assert np.isfinite(metrics[group]["fid"]) and 0 <= metrics[group]["precision"] <= 1
    assert json.loads((root / "results/classifier/metrics.json").read_text())["test_accuracy"] > 0.9
    assert (root / "results/sweep/table.json").is_file()
    assert len(list((root / "results/plot").glob("*.png"))) >= 4


def test_dvc_metrics_and_plots_see_the_outputs(pipeline):
    root, _ = pipeline
    metrics = json.loads(dvc(root, "metrics", "show", "--json"))
    files = next(iter(metrics.values()))["data"]
    assert {"results/evaluate/ddpm/metrics.json", "results/evaluate/ddgm/metrics.json",
            "results/classifier/metrics.json"} <= set(files)
    dvc(root, "plots", "show", "--json")
    assert "ddgm" in dvc(root, "params", "diff", "--all")


def test_mlflow_holds_tagged_runs_with_user_source_and_nesting(pipeline):
    root, _ = pipeline
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-diffusion")
    # MLflow 3's UI opens such an experiment on its model-training pages, not the GenAI overview.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    by_stage = {run.data.tags["stage"]: run for run in runs}
    assert set(STAGES) - {"download"} <= set(by_stage)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["git_commit"] not in ("", "unknown")
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"] == "LOCAL"
        assert run.data.tags["mlflow.source.name"].endswith(f"{run.data.tags['stage'].split('@')[0]}.py")
    for model in ("ddpm", "ddgm"):
        train_run = by_stage[f"train@{model}"]
        assert train_run.data.tags["model"] == model
        assert train_run.data.tags["model_file_sha256"] == file_digest(root / "models" / model / "model.pt")
        for stage in ("sample", "evaluate"):  # found by that digest: nothing of MLflow's in DVC's outputs
            assert by_stage[f"{stage}@{model}"].data.tags["mlflow.parentRunId"] == train_run.info.run_id
        assert sorted(p.name for p in (root / "models" / model).iterdir()) == ["model.pt"]


def headline_metrics(run) -> set[str]:
    return {key for key in run.data.metrics if not key.startswith("system/")}


def test_mlflow_metrics_are_the_headline_ones_and_training_curves_stay_within_the_epochs(pipeline):
    """Evaluation never lands on the training curves; detail goes to tables, not metrics."""
    root, _ = pipeline
    from mlflow.tracking import MlflowClient

    from diffusion.metrics import HEADLINE_SCORES
    from pipeline.common import mlflow_scores

    quality = set(mlflow_scores(dict.fromkeys(HEADLINE_SCORES, 0.0)))

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-diffusion")
    by_stage = {run.data.tags["stage"]: run
                for run in client.search_runs([experiment.experiment_id], max_results=100)}
    epochs = TINY_PARAMS["train"]["epochs"]
    for model in ("ddpm", "ddgm"):
        train_run = by_stage[f"train@{model}"]
        assert headline_metrics(train_run) == {"train_loss", "heldout_loss", "images_per_s"}
        for key in headline_metrics(train_run):
            steps = [m.step for m in client.get_metric_history(train_run.info.run_id, key)]
            assert steps and all(1 <= step <= epochs for step in steps), (key, steps)
        evaluate_run = by_stage[f"evaluate@{model}"]
        assert headline_metrics(evaluate_run) == {"eval_loss", *quality,
                                                  *(f"floor_{k}" for k in quality)}
        assert {"sample_precision", "sample_recall"} <= quality and "precision" not in quality
        tables = {a.path for a in client.list_artifacts(evaluate_run.info.run_id)}
        assert {"class_balance.json", "psnr.json", "metrics.json", "detail.json"} <= tables
    classifier_run = by_stage["classifier"]
    assert headline_metrics(classifier_run) == {"cross_entropy", "train_accuracy", "test_accuracy"}
    steps = [m.step for m in client.get_metric_history(classifier_run.info.run_id, "cross_entropy")]
    assert steps == list(range(1, TINY_PARAMS["classifier"]["epochs"] + 1))
    learnt_from = {d.dataset.name: {t.key: t.value for t in d.tags}["images"]
                   for d in classifier_run.inputs.dataset_inputs}
    subset = TINY_PARAMS["classifier"]["train_subset"]
    assert learnt_from == {"MNIST train": f"the first {subset} of 60000", "MNIST test": "all 10000"}
    assert headline_metrics(by_stage["sweep"]) == {
        "sweep_floor_fid", *(f"fid_{m}_{s}" for s in ("ancestral", "ddim") for m in ("ddpm", "ddgm"))}
    metrics_file = json.loads((root / "results/evaluate/ddpm/metrics.json").read_text())
    assert len(metrics_file) + len(metrics_file["quality"]) + len(metrics_file["floor"]) < 20


def test_mlflow_training_run_has_image_steps_datasets_system_metrics_and_a_registered_model(pipeline):
    root, _ = pipeline
    import mlflow
    from mlflow.tracking import MlflowClient

    import diffusion

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("mnist-diffusion")
    by_stage = {run.data.tags["stage"]: run
                for run in client.search_runs([experiment.experiment_id], max_results=100)}
    for model in ("ddpm", "ddgm"):
        run = by_stage[f"train@{model}"]
        run_id = run.info.run_id
        images = [a.path for a in client.list_artifacts(run_id, "images")]
        assert any(path.startswith("images/samples+step+1+") and path.endswith(".png") for path in images), images
        datasets = {(d.dataset.name, d.dataset.digest): {t.key: t.value for t in d.tags}
                    for d in run.inputs.dataset_inputs}
        names = {name: tags for (name, _), tags in datasets.items()}
        assert names["MNIST train"]["mlflow.data.context"] == "training"
        assert names["MNIST train"]["images"] == f"the first {TINY_PARAMS['data']['train_subset']} of 60000"
        assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics)
        [logged] = client.search_logged_models([experiment.experiment_id],
                                               filter_string=f"source_run_id = '{run_id}'")
        assert logged.name == model
        folder = Path(logged.artifact_location.removeprefix("file://"))
        info = mlflow.models.Model.load(folder / "MLmodel")
        assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 28, 28]
        assert info.signature.params.to_dict()[0]["name"] == "t"
        assert info.saved_input_example_info is not None
        [version] = client.search_model_versions(f"name = '{model}'")
        assert version.run_id == run_id
        loaded = diffusion.load_from_mlflow(f"models:/{model}/{version.version}", device="cpu",
                                            tracking_uri=uri)
        reference = diffusion.load(root / "models" / model / "model.pt", device="cpu")
        assert torch.equal(loaded.sample(4, steps=3, seed=1), reference.sample(4, steps=3, seed=1))


def test_second_repro_runs_nothing(pipeline):
    root, _ = pipeline
    assert stages_run(dvc(root, "repro")) == set()


def test_retraining_with_the_same_params_leaves_the_model_output_unchanged(pipeline):
    """No MLflow bookkeeping (a random run id) sits in DVC's outputs: the same params retrain
    to the same bytes, so the output's hash, and everything downstream, stays."""
    root, _ = pipeline
    lock = lambda: yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    model_hash = lambda: next(o["md5"] for o in lock()["train@ddpm"]["outs"]
                              if o["path"] == "models/ddpm")
    before = model_hash()
    assert stages_run(dvc(root, "repro", "--force", "--single-item", "train@ddpm")) == {"train@ddpm"}
    assert model_hash() == before
    # Only the plot re-runs: it draws the training log, whose images/s and seconds are timings.
    assert stages_run(dvc(root, "repro")) == {"plot"}


@pytest.mark.parametrize("edited, expected", [
    ("diffusion/sampling.py", {"train@ddpm", "train@ddgm", "sample@ddpm", "sample@ddgm",
                               "evaluate@ddpm", "evaluate@ddgm", "sweep", "plot"}),
    ("diffusion/classifier.py", {"classifier", "evaluate@ddpm", "evaluate@ddgm", "sweep", "plot"}),
    ("pipeline/mnist_sources.py", {"download"}),
])
def test_an_edit_changes_only_the_stages_that_run_the_edited_code(pipeline, tmp_path, edited, expected):
    root, _ = pipeline
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    with open(copy / edited, "a") as file:
        file.write("\n# an edit\n")
    changed = json.loads(dvc(copy, "status", "--json"))
    assert {stage for stage, changes in changed.items()
            if any("changed deps" in change for change in changes)} == expected


def test_changing_theta_0_reruns_only_the_ddgm_branch(pipeline):
    root, _ = pipeline
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["ddgm"]["theta_0"] = 0.002
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = stages_run(dvc(root, "repro"))
    assert rerun == {"train@ddgm", "sample@ddgm", "evaluate@ddgm", "sweep", "plot"}
