"""MLflow tracking for the stages: one experiment, one run per stage, logging that never sinks
a stage.

Every stage opens a ``Run`` before any work: its tags name the stage, the model, the git commit,
the DVC experiment (``dvc_exp``) and the process; sample and evaluate runs are nested under the
training run of the model file they read (found by the file's SHA-256, a tag of that run, so no
MLflow bookkeeping sits in DVC's outputs). Then ``log_params``, ``log_metrics`` (with a step:
the UI's curves), ``log_image`` (with a step: the UI's image slider), ``log_table``,
``log_dataset`` (the run's "Datasets"), ``system_metrics`` (CPU, memory, GPU while a block
runs), ``log_pytorch_model`` (the flavour, the registry and its ``newest`` alias) and
``finish``. A store that cannot be opened stops the stage in one line; after that, a failure
to log warns once and the stage goes on: its DVC outputs matter more than their record.
Opening the store safely (creation, locks, dead processes' runs) is ``pipeline.store``'s work.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import store
from pipeline.store import TrackingUnavailableError, repo_root, tracking_uri  # noqa: F401 (re-exported)

EXPERIMENT = "mnist-diffusion"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
SYSTEM_METRICS_INTERVAL_S = 5.0
MODEL_FILE_TAG = "model_file_sha256"  # on a training run: the digest of the model file it wrote
NEWEST_ALIAS = "newest"  # registry alias of each model's newest version ("latest" is MLflow's own)

# Runs this process has opened and not finished: closed as FAILED or KILLED if the stage dies.
_OPEN_RUNS: list["Run"] = []


def finish_open_runs(status: str) -> None:
    """End every run this process still holds open with ``status`` (FAILED, KILLED)."""
    for run in list(_OPEN_RUNS):
        run.finish(status)


def file_digest(path: Path | str) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Run:
    """One MLflow run of a stage. Logging failures warn once and never raise."""

    def __init__(self, stage: str, model: str | None = None, *, parent_model_file: Path | None = None,
                 run_id: str | None = None) -> None:
        """Open the store and start a run; ``run_id`` reopens that run when it still exists.

        ``parent_model_file``: the run is nested under the newest training run that wrote a
        file with these bytes (none if there is no such run), whose logged model is
        ``parent_model_id``. Runs of this stage left RUNNING
        by a process of this machine that has since died are closed as KILLED first.
        """
        self.stage = stage
        self._warned = False
        uri = tracking_uri()
        store.quiet_mlflow()
        store.check_reachable(uri)
        parent_digest = file_digest(parent_model_file) if parent_model_file else None
        try:
            with store.setup_lock(uri):
                run, experiment_id = store.retry(self._open, uri, stage, model, parent_digest, run_id)
        except Exception as error:
            raise TrackingUnavailableError(store.open_error(uri, error)) from None
        self.run_id = run.info.run_id
        self.experiment_id = experiment_id
        _OPEN_RUNS.append(self)

    def _open(self, uri: str, stage: str, model: str | None, parent_digest: str | None,
              run_id: str | None):
        self.client = store.open_client(uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(
                    EXPERIMENT, artifact_location=self._artifact_location(uri))
            except Exception as error:  # created meanwhile by a parallel run
                if store.is_lock_error(error):
                    raise
                experiment_id = self.client.get_experiment_by_name(EXPERIMENT).experiment_id
        else:
            experiment_id = experiment.experiment_id
        if experiment is None or experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            # MLflow 3's UI then opens the experiment on its model-training pages (runs, charts,
            # models), not on the GenAI overview (traces, prompts).
            self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        store.close_abandoned_runs(self.client, experiment_id, stage, keep=run_id)
        process = store.process_identity(os.getpid())
        tags = {"stage": stage, "git_commit": store.git_commit(), store.PROCESS_TAG: process}
        if model:
            tags["model"] = model
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp"] = os.environ["DVC_EXP_NAME"]
        self.parent_model_id = None  # the logged model of the parent training run
        if parent_digest and (parent := self._training_run(experiment_id, parent_digest)):
            tags["mlflow.parentRunId"] = parent
            models = self.client.search_logged_models(
                [experiment_id], filter_string=f"source_run_id = '{parent}'", max_results=1)
            self.parent_model_id = models[0].model_id if models else None
        if run_id and self._run_exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, store.PROCESS_TAG, process)
            return self.client.get_run(run_id), experiment_id
        # The tags mlflow.start_run would add (user, source, git commit): the UI's "User" and
        # "Source" columns.
        from mlflow.tracking.context.registry import resolve_tags

        return self.client.create_run(experiment_id, tags=resolve_tags(tags),
                                      run_name=stage), experiment_id

    @staticmethod
    def _artifact_location(uri: str) -> str | None:
        """Artifacts beside a local store (``mlartifacts/`` at the repo root); a server's own
        artifact store (``mlflow-artifacts:``, proxied) otherwise."""
        return (repo_root() / "mlartifacts").as_uri() if store.sqlite_path(uri) else None

    def _training_run(self, experiment_id: str, digest: str) -> str | None:
        runs = self.client.search_runs(
            [experiment_id], filter_string=f"tags.{MODEL_FILE_TAG} = '{digest}'",
            order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def _run_exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except Exception:
            return False

    def _safely(self, call, *args, **kwargs) -> Any:
        try:
            return store.retry(call, *args, **kwargs)
        except Exception as error:
            if not self._warned:
                path = store.sqlite_path(tracking_uri())
                cause = (f"the store {path} was removed" if path is not None and not path.exists()
                         else store.root_cause(error))
                print(f"warning: MLflow logging failed ({cause}); "
                      f"the stage goes on without it", file=sys.stderr)
                self._warned = True
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)) for k, v in _flatten(params).items()]
        for start in range(0, len(flat), 100):
            self._safely(self.client.log_batch, self.run_id, params=flat[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None,
                    model_id: str | None = None) -> None:
        """Metrics of this run at ``step``; with ``model_id`` also the logged model's (its
        page's "Metrics")."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0, model_id=model_id) for k, v in metrics.items()]
        self._safely(self.client.log_batch, self.run_id, metrics=batch)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        self._safely(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: Path | str, artifact_path: str | None = None) -> None:
        self._safely(self.client.log_artifacts, self.run_id, str(folder), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._safely(self.client.log_batch, self.run_id,
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_image(self, image: np.ndarray, key: str, step: int, scale: int = 4) -> None:
        """A uint8 (H, W) image under ``key`` at ``step`` (the UI's image slider), scaled up
        ``scale`` times by nearest neighbour so a 28 x 28 digit is visible."""
        big = np.kron(np.asarray(image, dtype=np.uint8), np.ones((scale, scale), dtype=np.uint8))
        self._safely(self.client.log_image, self.run_id, big, key=key, step=step)

    def log_table(self, data: dict[str, list], artifact_file: str) -> None:
        """Columns of values as an MLflow table (the UI's artifact view and evaluation tab)."""
        self._safely(self.client.log_table, self.run_id, data, artifact_file)

    def log_dataset(self, name: str, digest: str, source: Path, context: str,
                    tags: dict[str, str] | None = None) -> None:
        """A dataset as a run input (the run page's "Datasets"): its name, digest, source folder
        and what it was used for (``context``: training, evaluation)."""
        self._safely(_log_dataset, self.client, self.run_id, name, digest, source, context, tags or {})

    @contextlib.contextmanager
    def system_metrics(self, resume: bool = False) -> Iterator[None]:
        """CPU, memory, disk, network (and GPU, with pynvml) as ``system/...`` metrics of this
        run, sampled every SYSTEM_METRICS_INTERVAL_S seconds while the block runs
        (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it)."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = self._safely(SystemMetricsMonitor, self.run_id, resume_logging=resume,
                               sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                               tracking_uri=tracking_uri())
        if monitor is not None:
            monitor.start()
        try:
            yield
        finally:
            if monitor is not None:
                self._safely(monitor.finish)

    def log_pytorch_model(self, model, model_file: Path | str, name: str) -> str | None:
        """Log ``model`` (the ``DiffusionModel`` of ``model_file``) in MLflow's PyTorch flavour
        as the run's model ``name`` (``runs:/<run id>/<name>``), register it as a new version
        of ``name`` (``models:/<name>/<version>``, ``models:/<name>@newest``) and tag the run
        with the file's digest, by which later stages find it. Returns the logged model's id.

        ``mlflow.pytorch.load_model`` then returns a ``DiffusionModel`` that samples (it is
        pickled: MLflow refuses it when ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``);
        ``diffusion.load_from_mlflow`` reads the weights-only ``model_file`` logged beside it.
        """
        def tag_and_log() -> str:
            self.client.set_tag(self.run_id, MODEL_FILE_TAG, file_digest(model_file))
            return log_pytorch_model(self.run_id, self.experiment_id, model, model_file, name)

        return self._safely(tag_and_log)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (once; later calls do nothing)."""
        if self in _OPEN_RUNS:
            _OPEN_RUNS.remove(self)
            self._safely(self.client.set_terminated, self.run_id, status)


def log_pytorch_model(run_id: str, experiment_id: str, model, model_file: Path | str,
                      name: str) -> str:
    """Log ``model``, the ``DiffusionModel`` of ``model_file`` (EMA weights, on the CPU), with
    ``mlflow.pytorch.log_model`` to the run ``run_id`` as the model ``name``, and register it as
    a new version of the registered model ``name``, with the alias ``newest``.

    Its signature is the network's: x_t float32 (N, 1, 28, 28) in, the noise estimate of the
    same shape out, with the timestep ``t`` as an inference parameter (``predict(x_t,
    params={"t": 500})`` calls ``model(x_t, t=500)``), and for a conditional model the
    ``digit`` (-1: none) and the ``guidance`` weight too; the input example is two prior draws.
    The model directory holds the pickled module (``data/model.pth``), the ``diffusion`` package
    it needs (``code/``, put on ``sys.path`` by ``load_model``, so a fresh interpreter without
    this project installed loads it) and ``model_file`` (``extra_files/model.pt``, loadable with
    ``torch.load(weights_only=True)``). Returns the logged model's id. The pip requirements
    are given, not inferred: inference would load the model in a subprocess and take seconds. MLflow 3 files the model as
    a LoggedModel of the current experiment (not the run's), hence ``set_experiment``; the run's
    ``runs:/<run id>/<name>`` resolves to it. Raises on failure.
    """
    import importlib.metadata
    import logging

    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    def pinned(package: str) -> str:
        return f"{package}=={importlib.metadata.version(package).split('+')[0]}"

    logger = logging.getLogger("mlflow.pytorch")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.ERROR)  # the pickle-format warning: the weights-only file is beside it
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no bar in the stage's log
    t = model.process.n_T // 2
    x_t = model.process.prior((2, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    params = {"t": t, **({"digit": -1, "guidance": 0.0} if model.classes else {})}
    signature = infer_signature(x_t.numpy(), model(x_t, **params).detach().numpy(), params=params)
    try:
        mlflow.set_experiment(experiment_id=experiment_id)
        package = Path(sys.modules[type(model).__module__.split(".")[0]].__file__).parent
        info = mlflow.pytorch.log_model(
            model, name=name, run_id=run_id, registered_model_name=name,
            signature=signature, input_example=(x_t.numpy(), params),
            serialization_format="pickle", code_paths=[str(package)],
            extra_files=[str(model_file)],
            pip_requirements=[pinned(p) for p in ("torch", "torchvision", "numpy", "cloudpickle")])
        # MLflow 3 names versions by alias, not stage: models:/<name>@newest is the newest.
        mlflow.MlflowClient().set_registered_model_alias(name, NEWEST_ALIAS,
                                                         info.registered_model_version)
        return info.model_id
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def _log_dataset(client, run_id: str, name: str, digest: str, source: Path, context: str,
                 tags: dict[str, str]) -> None:
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": local is meant
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(str(Path(source).resolve()))
    dataset = MetaDataset(source, name=name, digest=digest)._to_mlflow_entity()
    input_tags = [InputTag("mlflow.data.context", context),
                  *(InputTag(key, value) for key, value in tags.items())]
    client.log_inputs(run_id, [DatasetInput(dataset, input_tags)])


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
