"""Fault suite, part two: the MLflow store and what a hostile try-out found.

- an unreachable MLflow store stops training before it starts; a store failing mid-run does not;
- two queued DVC experiments run in parallel into one MLflow store;
- a store killed while it is created, half built, locked or removed; damaged model, classifier
  and sample files; a full disk: each ends in one line that names the cause.

Stages run as the real CLIs in scratch copies of the repo (tests/faults.py) with tiny params
and synthetic MNIST.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from diffusion.io import atomic_path, save_torch
from tests.faults import (env_for, loss_rows, reference, resume_files, run_main,  # noqa: F401
                          run_stage, scratch, stage_cmd, stage_with, tree)

pytestmark = pytest.mark.slow  # stages run in subprocesses and scratch repos


# ---------------------------------------------------------------- tracking never loses a run
def test_unopenable_tracking_store_stops_training_before_it_starts(tmp_path):
    root = scratch(tmp_path / "repo")
    (tmp_path / "a-file").write_text("")  # a store below a regular file cannot be created, even as root
    uri = f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"
    result = run_stage(root, "train", "ddpm", env=env_for(root, MLFLOW_TRACKING_URI=uri))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot open the MLflow tracking store at {uri}")
    assert "epoch" not in result.stdout
    assert not any((root / d).exists() for d in ("models", "results", ".resume"))


def test_tracking_failing_mid_training_warns_once_and_outputs_finish(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    root = scratch(tmp_path / "repo")
    real_log_batch, metric_batches = MlflowClient.log_batch, []

    def log_batch(self, run_id, metrics=(), *args, **kwargs):
        if metrics and not metrics[0].key.startswith("system/"):  # the stage's, not the monitor's
            metric_batches.append(metrics)
            if len(metric_batches) > 1:
                raise ConnectionError("tracking store went away")
        return real_log_batch(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    run_main(monkeypatch, root, "train", "ddgm")
    err = capsys.readouterr().err
    # every epoch tried to log (the last one's with the logged model's id)
    assert [batch[0].step for batch in metric_batches] == [1, 2, 3]
    assert err.count("warning: MLflow logging failed") == 1, err
    assert (root / "models/ddgm/model.pt").is_file()
    assert [row[0] for row in loss_rows(root)] == ["1", "2", "3"]


# ---------------------------------------------------------------- parallel experiments
def test_two_queued_experiments_run_in_parallel_into_one_mlflow_store(tmp_path):
    root = scratch(tmp_path / "repo", {"train": {"epochs": 1}})
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    del dvc_yaml["stages"]["download"]  # the synthetic MNIST files are committed to git instead
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    env = env_for(root)
    del env["MLFLOW_TRACKING_URI"]  # the default store: <repo root>/mlflow.db

    def sh(*cmd: str, timeout: float = 120) -> str:
        result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                                timeout=timeout)
        assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    for command in (("git", "init", "-q", "-b", "main"), ("git", "config", "user.email", "t@example.com"),
                    ("git", "config", "user.name", "t"), ("dvc", "init", "-q"),
                    ("dvc", "config", "core.analytics", "false"), ("git", "add", "-A"),
                    ("git", "add", "-f", "data/MNIST/raw"),  # .gitignore names it: it is a download output
                    ("git", "commit", "-q", "-m", "scratch")):
        sh(*command)
    names = []
    for seed in (1, 2):
        out = sh("dvc", "exp", "run", "--queue", "train@ddpm", "-S", f"seed={seed}")
        names.append(out.split("Queued experiment '")[1].split("'")[0])
    sh("dvc", "queue", "start", "-j", "2", timeout=300)  # slow to return on a loaded machine
    try:
        deadline = time.monotonic() + 240
        while True:
            status = sh("dvc", "queue", "status")
            rows = {line.split()[1]: line.split()[-1] for line in status.splitlines()
                    if line.split() and line.split()[0] not in ("Task", "Worker")}
            if all(rows.get(name) in ("Success", "Failed") for name in names):
                break
            assert time.monotonic() < deadline, status
            time.sleep(2)
        logs = {name: subprocess.run(["dvc", "queue", "logs", name], cwd=root, env=env,
                                     capture_output=True, text=True).stdout for name in names}
        assert all(rows[name] == "Success" for name in names), logs
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=root, env=env, capture_output=True)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mnist-diffusion").experiment_id])
    assert sorted(run.data.tags.get("dvc_exp") for run in runs) == sorted(names)
    assert all(run.info.status == "FINISHED" and run.data.tags["stage"] == "train@ddpm" for run in runs)
    assert all({"train_loss", "heldout_loss"} <= set(run.data.metrics) for run in runs)
    assert not list((root / ".dvc").rglob("mlflow.db"))  # nothing landed in the temporary copies


# ---------------------------------------------------------------- a hostile try-out's findings
def copy_of(reference: Path, tmp_path: Path) -> Path:
    """A private copy of the trained reference repo (a test may damage it), with its store
    but none of its runs (deleted), so ``runs_of`` sees only the runs the test makes."""
    from mlflow.tracking import MlflowClient

    root = tmp_path / "repo"
    shutil.copytree(reference, root)
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-diffusion")
    for run in client.search_runs([experiment.experiment_id]):
        client.delete_run(run.info.run_id)
    return root


def runs_of(root: Path, stage: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-diffusion")
    return [run for run in client.search_runs([experiment.experiment_id])
            if run.data.tags.get("stage") == stage]


def sample_stage_with(patch: str) -> list[str]:
    return stage_with(patch, "sample", "ddgm")


def test_store_creation_killed_at_any_moment_leaves_a_store_the_next_stage_opens(reference, tmp_path):
    """Killing the first stage while MLflow builds mlflow.db (tables, then migrations) used to
    leave a half-built store that every later stage refused ("table ... already exists")."""
    root = copy_of(reference, tmp_path)
    for delay in (0.05, 0.3, 0.8, 1.5):
        (root / "mlflow.db").unlink(missing_ok=True)
        proc = subprocess.Popen(stage_cmd("sample", "ddgm"), cwd=root, env=env_for(root),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not list(root.glob("*mlflow.db*")) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        rerun = run_stage(root, "sample", "ddgm")
        assert rerun.returncode == 0, f"killed {delay} s into store creation:\n{rerun.stderr}"
        assert sorted(p.name for p in root.glob("*mlflow.db*")) == ["mlflow.db"]


def test_half_built_store_is_refused_in_one_line_that_says_what_to_do(reference, tmp_path):
    import sqlite3

    root = copy_of(reference, tmp_path)
    (root / "mlflow.db").unlink()
    with sqlite3.connect(root / "mlflow.db") as db:  # the first tables of a killed creation
        db.execute("CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("CREATE TABLE logged_models (model_id TEXT PRIMARY KEY)")
    result = run_stage(root, "sample", "ddgm")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot open the MLflow tracking store at sqlite:///{root / 'mlflow.db'}")
    assert f"mv {root / 'mlflow.db'} {root / 'mlflow.db'}.broken" in line, line


@pytest.mark.parametrize("content, why", [
    (lambda good: good.astype(np.float32) / 255, "got float32 (32, 28, 28)"),
    (lambda good: good.astype(np.float64), "got float64 (32, 28, 28)"),
    (lambda good: np.full((32, 28, 28), np.nan, np.float32), "float32 (32, 28, 28) holding NaN"),
    (lambda good: good[:, :14], "got uint8 (32, 14, 28)"),
    (lambda good: good[:0], "got uint8 (0, 28, 28)"),
    (lambda good: b"1 2 3\n4 5 6\n", "not a NumPy .npy file"),
    (lambda good: np.array([{"pickled": 1}], dtype=object), "not a plain NumPy array"),
], ids=["unit-float", "0-255-float", "nan", "shape", "empty", "text", "pickle"])
def test_evaluate_refuses_samples_that_are_not_the_sample_stages_uint8_images(reference, tmp_path,
                                                                               content, why):
    """Float images were scored as if they were uint8 (FID 495 for [0, 1], 3.5e7 for 0-255)."""
    root = copy_of(reference, tmp_path)
    assert run_stage(root, "sample", "ddgm").returncode == 0
    samples = root / "results/sample/ddgm/samples.npy"
    bad = content(np.load(samples))
    if isinstance(bad, bytes):
        samples.write_bytes(bad)
    else:
        np.save(samples, bad, allow_pickle=True)
    result = run_stage(root, "evaluate", "ddgm")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: results/sample/ddgm/samples.npy: ") and why in line, line
    assert "dvc repro --force sample@ddgm" in line
    assert not (root / "results/evaluate").exists()


def flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, why", [
    (flip_bytes, "damaged: its contents do not match the checksum"),
    (lambda p: p.write_bytes(p.read_bytes()[:1000]), "not a readable torch file, truncated or damaged"),
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (lambda p: torch.save({"config": {}, "ema": {}, "net": {}}, p), "it has no checksum"),
    (lambda p: save_torch({"config": {}, "state_dict": {}}, p), "not a model file of the train stage"),
], ids=["flipped", "truncated", "empty", "foreign", "classifier-file"])
def test_damaged_or_foreign_model_file_is_refused_in_one_line(reference, tmp_path, damage, why):
    """64 flipped bytes in the middle of a model file used to load and sample (17 EMA weights
    changed, the largest to 453); truncated or foreign files gave EOFError/KeyError tracebacks."""
    root = copy_of(reference, tmp_path)
    damage(root / "models/ddgm/model.pt")
    before = tree(root / "results")
    result = run_stage(root, "sample", "ddgm")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: models/ddgm/model.pt: ") and why in line, line
    assert line.endswith("re-create it with `dvc repro --force train@ddgm`")
    assert tree(root / "results") == before


def test_flipped_bytes_in_the_classifier_file_are_refused(reference, tmp_path):
    from diffusion.classifier import MnistClassifier, load_classifier, save_classifier
    from diffusion.io import ModelFileError

    path = tmp_path / "classifier.pt"
    save_classifier(MnistClassifier(), path)
    load_classifier(path, torch.device("cpu"))
    flip_bytes(path)
    with pytest.raises(ModelFileError, match="damaged"):
        load_classifier(path, torch.device("cpu"))


def test_failing_stage_ends_its_run_failed_and_a_killed_ones_run_is_closed_killed(reference, tmp_path):
    """Runs of failed or killed sample/evaluate stages stayed RUNNING for ever."""
    root = copy_of(reference, tmp_path)
    failing = ("import diffusion.model\n"
               "def broken(*args, **kwargs):\n    raise RuntimeError('out of luck')\n"
               "diffusion.model.DiffusionModel.sample = broken")
    result = subprocess.run(sample_stage_with(failing), cwd=root, env=env_for(root),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "out of luck" in result.stderr
    assert [run.info.status for run in runs_of(root, "sample@ddgm")] == ["FAILED"]

    proc = subprocess.Popen(sample_stage_with(failing.replace(
        "raise RuntimeError('out of luck')", "import time; time.sleep(600)")),
        cwd=root, env=env_for(root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(runs_of(root, "sample@ddgm")) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert sorted(run.info.status for run in runs_of(root, "sample@ddgm")) == ["FAILED", "RUNNING"]
    assert run_stage(root, "sample", "ddgm").returncode == 0
    assert sorted(run.info.status for run in runs_of(root, "sample@ddgm")) == \
        ["FAILED", "FINISHED", "KILLED"]


def test_unreachable_tracking_server_fails_within_seconds_in_one_line(reference, tmp_path):
    """MLflow retried http://127.0.0.1:9/ for 251 s before saying anything."""
    root = copy_of(reference, tmp_path)
    before = tree(root / "results")
    started = time.monotonic()
    result = run_stage(root, "sample", "ddgm",
                       env=env_for(root, MLFLOW_TRACKING_URI="http://127.0.0.1:9/"))
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach the MLflow tracking server at http://127.0.0.1:9/")
    assert tree(root / "results") == before


def test_store_locked_by_another_writer_for_12_s_is_waited_for(reference, tmp_path):
    """The stage gave up after 8.6 s although its retries promised about 25 s."""
    import sqlite3
    import threading

    root = copy_of(reference, tmp_path)
    locked = threading.Event()

    def hold_lock() -> None:
        db = sqlite3.connect(root / "mlflow.db", isolation_level=None, check_same_thread=False)
        db.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(12)
        db.execute("COMMIT")
        db.close()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    locked.wait()
    result = run_stage(root, "sample", "ddgm")
    holder.join()
    assert result.returncode == 0, result.stderr
    assert [run.info.status for run in runs_of(root, "sample@ddgm")] == ["FINISHED"]


def test_store_removed_mid_training_gives_one_warning_and_no_tracebacks(tmp_path):
    """MLflow's own 4 ERROR entries and 8 tracebacks used to follow the removal."""
    root = scratch(tmp_path / "repo", {"train": {"epochs": 4}})
    proc = subprocess.Popen(stage_cmd("train", "ddgm"), cwd=root, env=env_for(root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not resume_files(root):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    (root / "mlflow.db").unlink()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert err.strip().splitlines() == [
        f"warning: MLflow logging failed (the store {root / 'mlflow.db'} was removed); "
        "the stage goes on without it"], err
    assert (root / "models/ddgm/model.pt").is_file() and "4 epochs" in out


def test_store_errors_name_their_cause_not_the_wrapper():
    """A read-only store showed SQLAlchemy's autoflush advice and hid sqlite3's reason."""
    import sqlite3

    import sqlalchemy

    from pipeline.store import root_cause

    with pytest.raises(sqlalchemy.exc.OperationalError) as info:
        engine = sqlalchemy.create_engine(
            "sqlite://", creator=lambda: sqlite3.connect("file::memory:?mode=ro", uri=True))
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("CREATE TABLE t (x INTEGER)"))
    try:
        raise RuntimeError("(raised as a result of Query-invoked autoflush; consider using a "
                           "session.no_autoflush block ...)") from info.value
    except RuntimeError as wrapped:
        assert root_cause(wrapped) in ("attempt to write a readonly database",
                                       "unable to open database file")
    full = sqlite3.OperationalError("database or disk is full")
    assert root_cause(full) == "no space left on the device that holds the store"


@pytest.mark.parametrize("failure", [
    OSError(28, "No space left on device"),
    OSError("50176 requested and 24448 written"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 2048"),
], ids=["ENOSPC", "short-write", "torch-zip"])
def test_full_disk_is_named_in_one_line_whatever_the_writer_says(tmp_path, monkeypatch, failure):
    import shutil as shutil_module

    from diffusion.io import NoSpaceError

    if not isinstance(failure, OSError) or failure.errno is None:  # the writer says nothing of
        monkeypatch.setattr(shutil_module, "disk_usage",            # space: the free bytes do
                            lambda path: shutil_module._ntuple_diskusage(10**9, 10**9, 4096))
    with pytest.raises(NoSpaceError, match=f"^no space left on {tmp_path}: free some space"):
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise failure
    assert list(tmp_path.iterdir()) == []


def test_stage_on_a_full_disk_fails_in_one_line_and_ends_its_run_failed(reference, tmp_path):
    root = copy_of(reference, tmp_path)
    full = ("import errno\nimport numpy as np\n"
            "def no_space(*args, **kwargs):\n"
            "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
            "np.save = no_space")
    result = subprocess.run(sample_stage_with(full), cwd=root, env=env_for(root),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: no space left on results/sample/ddgm: free some space and re-run"]
    assert [run.info.status for run in runs_of(root, "sample@ddgm")] == ["FAILED"]


def test_resume_states_of_other_params_are_reported_with_where_and_how_big(tmp_path):
    """Resume files of params that had since changed piled up unseen; they are kept (they
    resume if the params change back) but a train stage now says where they are and their size."""
    root = scratch(tmp_path / "repo", {"train": {"epochs": 1}})
    resume = root / ".resume"
    earlier = [resume / f"train@ddgm-{'0' * 15}{i}.pt" for i in (1, 2)]
    other_stage = resume / f"train@ddpm-{'0' * 16}.pt"
    for path in (*earlier, other_stage):
        save_torch({"epoch": 1, "net": {}, "ema": {}, "filler": torch.zeros(2**17)}, path)
    result = run_stage(root, "train", "ddgm")
    assert result.returncode == 0, result.stderr
    assert (f"train@ddgm: 2 resume state(s) of other params or data (1.0 MiB) in {resume}: "
            f"{earlier[0].name}, {earlier[1].name}; they resume if those params come back, "
            "delete them to free the space") in result.stdout
    assert "resuming" not in result.stdout
    assert sorted(resume.iterdir()) == sorted([*earlier, other_stage])
