"""MLflow tracking for the stages: one store, one experiment, tagged runs that never sink a stage.

The store is SQLite at ``<repo root>/mlflow.db`` with artifacts under ``<repo root>/mlartifacts``;
``MLFLOW_TRACKING_URI`` overrides it. The repo root is ``DVC_ROOT`` when DVC runs the stage.
``dvc exp run --temp`` and queued experiments run in a copy of the repo under
``.dvc/tmp/exps/``: their runs are sent to the store of the repo that holds that copy, so every
experiment lands in one place.

The stage opens the store before any work, so a store that cannot be opened stops the stage at
once. After that, a failure to log is reported once on stderr and the stage goes on: training
and its DVC outputs matter more than the record of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

EXPERIMENT = "mnist-diffusion"


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store could not be opened."""


def repo_root() -> Path:
    """The repository root: DVC_ROOT (outside DVC's temporary experiment copies) or the cwd."""
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def _store_setup_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock while a run opens (and maybe creates) the store.

    Opening a new or older SQLite store runs MLflow's schema migrations; two processes doing
    that at once (``dvc queue start -j 2``) make one of them fail. The lock file lives in the
    temporary folder, named after the URI, so it is shared by every process on this machine
    and leaves nothing in the repository. Without ``fcntl`` (Windows) no lock is taken.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    name = f"mlflow-store-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"
    with open(Path(tempfile.gettempdir()) / name, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _retry(call, *args, attempts: int = 8, **kwargs):
    """Retry a tracking call: SQLite answers 'database is locked' while another run writes."""
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except Exception as error:
            if "locked" not in str(error).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)


class Run:
    """One MLflow run of a stage. Logging failures warn once and never raise."""

    def __init__(self, stage: str, model: str | None = None, parent_run_id: str | None = None,
                 run_name: str | None = None, run_id: str | None = None) -> None:
        """Open the store and start a run; ``run_id`` reopens that run when it still exists."""
        import mlflow
        from mlflow.tracking import MlflowClient

        self.stage = stage
        self._warned = False
        uri = tracking_uri()
        try:
            with _store_setup_lock(uri):
                mlflow.set_tracking_uri(uri)
                self.client = MlflowClient(uri)
                experiment = _retry(self.client.get_experiment_by_name, EXPERIMENT)
                if experiment is None:
                    try:
                        experiment_id = _retry(
                            self.client.create_experiment, EXPERIMENT,
                            artifact_location=(repo_root() / "mlartifacts").as_uri())
                    except Exception:  # created meanwhile by a parallel run
                        experiment_id = _retry(self.client.get_experiment_by_name,
                                               EXPERIMENT).experiment_id
                else:
                    experiment_id = experiment.experiment_id
                tags = {"stage": stage, "git_commit": git_commit()}
                if model:
                    tags["model"] = model
                if os.environ.get("DVC_EXP_NAME"):
                    tags["dvc_exp"] = os.environ["DVC_EXP_NAME"]
                if parent_run_id and self._run_exists(parent_run_id):
                    tags["mlflow.parentRunId"] = parent_run_id
                if run_id and self._run_exists(run_id):
                    _retry(self.client.update_run, run_id, status="RUNNING")
                    run = self.client.get_run(run_id)
                else:
                    run = _retry(self.client.create_run, experiment_id, tags=tags,
                                 run_name=run_name or stage)
        except Exception as error:
            raise TrackingUnavailableError(
                f"cannot open the MLflow tracking store at {uri}: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''} (set MLFLOW_TRACKING_URI to "
                "a reachable store)") from None
        self.run_id = run.info.run_id
        self.experiment_id = experiment_id

    def _run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:
            return False

    def _safely(self, call, *args, **kwargs) -> Any:
        try:
            return _retry(call, *args, **kwargs)
        except Exception as error:
            if not self._warned:
                print(f"warning: MLflow logging failed ({type(error).__name__}: {error}); "
                      f"the stage goes on without it", file=sys.stderr)
                self._warned = True
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)) for k, v in _flatten(params).items()]
        for start in range(0, len(flat), 100):
            self._safely(self.client.log_batch, self.run_id, params=flat[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None,
                    run_id: str | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._safely(self.client.log_batch, run_id or self.run_id, metrics=batch)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        self._safely(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: Path | str, artifact_path: str | None = None) -> None:
        self._safely(self.client.log_artifacts, self.run_id, str(folder), artifact_path)

    def log_pytorch_model(self, model_file: Path | str, name: str = "model") -> None:
        """Log the model file's ``DiffusionModel`` in MLflow's PyTorch flavour as
        ``runs:/<run id>/<name>``.

        ``mlflow.pytorch.load_model`` then returns a ``DiffusionModel`` that samples (it is
        pickled: MLflow refuses it when ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``);
        ``diffusion.load_from_mlflow`` reads the weights-only ``model_file`` logged beside it.
        """
        self._safely(log_pytorch_model, self.run_id, self.experiment_id, model_file, name)

    def finish(self, status: str = "FINISHED") -> None:
        self._safely(self.client.set_terminated, self.run_id, status)


def log_pytorch_model(run_id: str, experiment_id: str, model_file: Path | str,
                      name: str = "model") -> None:
    """Log the ``DiffusionModel`` of ``model_file`` (EMA weights, on the CPU) with
    ``mlflow.pytorch.log_model`` to the run ``run_id``.

    The model directory holds the pickled module (``data/model.pth``), the ``diffusion`` package
    it needs (``code/``, put on ``sys.path`` by ``load_model``, so a fresh interpreter without
    this project installed loads it) and ``model_file`` (``extra_files/model.pt``, loadable with
    ``torch.load(weights_only=True)``). The pip requirements are given, not inferred: inference
    would load the model in a subprocess and take several seconds. MLflow 3 files the model as
    a LoggedModel of the current experiment (not the run's), hence ``set_experiment``; the run's
    ``runs:/<run id>/<name>`` resolves to it. Raises on failure.
    """
    import importlib.metadata
    import logging

    import mlflow.pytorch

    import diffusion
    from diffusion.model import load

    def pinned(package: str) -> str:
        return f"{package}=={importlib.metadata.version(package).split('+')[0]}"

    logger = logging.getLogger("mlflow.pytorch")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.ERROR)  # the pickle-format warning: the weights-only file is beside it
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no bar in the stage's log
    try:
        mlflow.set_experiment(experiment_id=experiment_id)
        mlflow.pytorch.log_model(
            load(model_file, device="cpu"), name=name, run_id=run_id,
            serialization_format="pickle",
            code_paths=[str(Path(diffusion.__file__).parent)],
            extra_files=[str(model_file)],
            pip_requirements=[pinned(p) for p in ("torch", "torchvision", "numpy", "cloudpickle")])
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
