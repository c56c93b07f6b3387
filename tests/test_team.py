"""Team use: trained outputs shared through a DVC remote, every run tracked on one MLflow server.

One scratch repo ("clone A", real MNIST, tiny params) runs the pipeline while tracking into a
real ``mlflow server`` (SQLite backend, proxied artifacts in a folder of its own, on 127.0.0.1),
commits its dvc.lock, and pushes its outputs and run cache to a local-folder DVC remote and
its commits to a bare git remote. The tests then work from fresh clones of that remote, as a
collaborator would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import make_scratch_repo, stage_env

pytestmark = pytest.mark.slow  # real `dvc repro` runs and a real MLflow server

DDGM_BRANCH = {"train@ddgm", "sample@ddgm", "evaluate@ddgm", "sweep", "plot"}


def sh(cwd: Path, *cmd: str, env: dict | None = None, check: bool = True,
       timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env or stage_env(), capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}\n{result.stderr}"
    return result


def stages_run(result: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", result.stdout + result.stderr))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1, stopped by its pid whatever happens."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"),
         "--workers", "1"],
        cwd=folder, env=stage_env(), stdout=subprocess.DEVNULL,
        stderr=open(folder / "server.log", "w"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, (folder / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the MLflow server did not start in 120 s"
            time.sleep(0.5)
        yield uri, folder
    finally:  # the server and its workers: one process group, started for this test
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
                process.wait(timeout=30)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def team(tmp_path_factory, mnist_raw_dir, server):
    """Clone A after `dvc repro` (tracked on the server) and `dvc push --run-cache`; the DVC
    and git remotes it pushed to."""
    uri, _ = server
    base = tmp_path_factory.mktemp("team")
    storage, origin = base / "dvc-storage", base / "origin.git"
    a = make_scratch_repo(base / "a", mnist_dir=mnist_raw_dir)
    env = {**stage_env(), "MLFLOW_TRACKING_URI": uri}
    sh(base, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    sh(a, "git", "remote", "add", "origin", str(origin))
    sh(a, "dvc", "remote", "add", "-d", "storage", str(storage))
    sh(a, "dvc", "repro", env=env)
    sh(a, "git", "add", "-A")  # dvc.lock, the remote's config, DVC's .gitignore files
    sh(a, "git", "commit", "-q", "-m", "tiny run")
    sh(a, "git", "push", "-q", "origin", "main")
    sh(a, "dvc", "push", "--run-cache")
    shutil.copy(a / "models/ddpm/model.pt", base / "first-ddpm.pt")
    shutil.copy(a / "results/sweep/table.json", base / "first-table.json")
    return {"a": a, "storage": storage, "origin": origin, "uri": uri, "base": base}


def clone(team: dict, name: str) -> Path:
    target = team["base"] / name
    sh(team["base"], "git", "clone", "-q", str(team["origin"]), str(target))
    return target


# ---------------------------------------------------------------- the DVC remote
def test_a_fresh_clone_pulls_the_outputs_and_runs_nothing(team):
    b = clone(team, "b")
    sh(b, "dvc", "pull")
    assert (b / "models/ddpm/model.pt").is_file() and (b / "results/sweep/table.json").is_file()
    assert "up to date" in sh(b, "dvc", "status").stdout
    assert stages_run(sh(b, "dvc", "repro")) == set()

    params = yaml.safe_load((b / "params.yaml").read_text())
    params["ddgm"]["theta_0"] = 0.002
    (b / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert stages_run(sh(b, "dvc", "repro")) == DDGM_BRANCH


def test_the_run_cache_restores_outputs_without_running_a_stage(team):
    c = clone(team, "c")
    sh(c, "git", "rm", "-q", "dvc.lock")   # nothing says which outputs the params made...
    result = sh(c, "dvc", "repro", "--pull")  # ...but the remote's run cache knows
    assert stages_run(result) == set(), result.stdout
    assert result.stdout.count("is cached - skipping run, checking out outputs") == 10
    assert (c / "models/ddgm/model.pt").read_bytes() == (team["a"] / "models/ddgm/model.pt").read_bytes()


def test_an_experiment_pushed_from_one_clone_shows_in_another(team):
    a = team["a"]
    # A sweep over fewer steps: only the sweep runs again.
    result = sh(a, "dvc", "exp", "run", "-n", "fewer-steps", "-S", "sweep.steps=[10]",
                env={**stage_env(), "MLFLOW_TRACKING_URI": team["uri"]})
    assert stages_run(result) == {"sweep"}
    sh(a, "dvc", "exp", "push", "origin", "fewer-steps")
    d = clone(team, "d")
    sh(d, "dvc", "exp", "pull", "origin", "fewer-steps")
    shown = json.loads(sh(d, "dvc", "exp", "show", "--json").stdout)
    experiments = [exp for commit in shown for exp in (commit.get("experiments") or [])]
    [fewer] = [exp for exp in experiments if exp.get("name") == "fewer-steps"]
    params = fewer["revs"][0]["data"]["params"]["params.yaml"]["data"]
    assert params["sweep"]["steps"] == [10]
    sh(d, "dvc", "exp", "apply", "fewer-steps")
    sh(d, "dvc", "pull")  # the experiment's outputs, from the DVC remote
    # A's workspace holds the experiment's results, as `dvc exp run` leaves them.
    table = "results/sweep/table.json"
    assert (d / table).read_bytes() == (a / table).read_bytes()
    first = json.loads((team["base"] / "first-table.json").read_text())
    assert json.loads((d / table).read_text()) != first


def test_a_wrong_remote_fails_in_one_error_line(team):
    e = clone(team, "e")
    sh(e, "dvc", "remote", "modify", "storage", "url", str(team["base"] / "no-such-storage"))
    result = sh(e, "dvc", "pull", check=False, timeout=120)
    assert result.returncode != 0
    assert [line for line in result.stderr.splitlines() if line.startswith("ERROR")], result.stderr


# ---------------------------------------------------------------- the MLflow server
def test_every_run_metric_image_dataset_and_model_is_on_the_server(team, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import diffusion

    uri = team["uri"]
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("mnist-diffusion")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    first_runs = [run for run in runs if not run.data.tags.get("dvc_exp")]
    assert {run.data.tags["stage"] for run in first_runs} >= {
        "classifier", "train@ddpm", "train@ddgm", "sample@ddpm", "sample@ddgm", "evaluate@ddpm",
        "evaluate@ddgm", "sweep", "plot"}
    for run in first_runs:
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        assert str(team["a"]) not in run.info.artifact_uri
    by_stage = {run.data.tags["stage"]: run for run in first_runs}
    for model in ("ddpm", "ddgm"):
        train = by_stage[f"train@{model}"]
        assert {"train_loss", "heldout_loss"} <= set(train.data.metrics)
        assert client.list_artifacts(train.info.run_id, "images")
        assert {d.dataset.name for d in train.inputs.dataset_inputs} == {"MNIST train", "MNIST test"}
        assert "fid" in by_stage[f"evaluate@{model}"].data.metrics
        assert by_stage[f"evaluate@{model}"].data.tags["mlflow.parentRunId"] == train.info.run_id
    [logged] = client.search_logged_models([experiment.experiment_id],
                                           filter_string=f"source_run_id = '{by_stage['train@ddpm'].info.run_id}'")
    assert logged.artifact_location.startswith("mlflow-artifacts:")
    assert {m.key for m in logged.metrics} >= {"train_loss", "fid"}

    # Elsewhere, with no clone's files at hand, the registered model loads from the server.
    monkeypatch.chdir(tmp_path)
    model = diffusion.load_from_mlflow("models:/ddpm/1", device="cpu", tracking_uri=uri)
    expected = diffusion.load(team["base"] / "first-ddpm.pt", device="cpu")
    assert model.sample(4, steps=3, seed=1).equal(expected.sample(4, steps=3, seed=1))
    newest = client.get_model_version_by_alias("ddpm", "newest")
    assert int(newest.version) == max(int(v.version) for v in client.search_model_versions("name = 'ddpm'"))
    assert diffusion.load_from_mlflow("models:/ddpm@newest", device="cpu", tracking_uri=uri)


def test_a_server_nobody_answers_at_stops_a_stage_in_one_line_within_seconds(team, tmp_path):
    root = team["a"]
    env = {**stage_env(), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    started = time.monotonic()
    result = sh(root, sys.executable, "-m", "stages.sample", "ddpm", env=env, check=False)
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot reach the MLflow tracking server" in result.stderr
