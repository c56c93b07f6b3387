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
import glob
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

EXPERIMENT = "mnist-diffusion"
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
SYSTEM_METRICS_INTERVAL_S = 5.0
OWNER_TAG = "owner"  # host:pid:start of the process that runs it, to close runs of dead ones


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


# How long a stage waits for a store that another process holds locked (SQLite allows one
# writer at a time; a parallel experiment's migration or a long write can hold it for seconds).
LOCK_WAIT_S = 60.0


def _messages(error: BaseException) -> list[str]:
    """The first line of ``error`` and of every error behind it (SQLAlchemy wraps sqlite3's)."""
    seen, out = set(), []
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for candidate in (error, getattr(error, "orig", None)):
            text = str(candidate or "").strip()
            if candidate is not None and text:
                out.append(f"{type(candidate).__name__}: {text.splitlines()[0]}")
        error = error.__cause__ or error.__context__
    return out


def root_cause(error: BaseException) -> str:
    """One line naming what really went wrong, not the wrapper's text.

    A read-only store surfaces as SQLAlchemy's autoflush advice around sqlite3's "attempt to
    write a readonly database"; a full disk as "database or disk is full". The innermost
    message says what to fix.
    """
    messages = _messages(error)
    if not messages:
        return type(error).__name__
    for text in messages:
        if "disk is full" in text or "No space left" in text:
            return "no space left on the device that holds the store"
    return messages[-1].split(": ", 1)[1] if ": " in messages[-1] else messages[-1]


def _is_lock_error(error: BaseException) -> bool:
    return any("locked" in text.lower() or "busy" in text.lower() for text in _messages(error))


def _retry(call, *args, wait_s: float = LOCK_WAIT_S, **kwargs):
    """Retry ``call`` while the SQLite store answers 'database is locked', for up to ``wait_s``."""
    deadline, delay = time.monotonic() + wait_s, 0.1
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as error:
            if not _is_lock_error(error) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///<path>`` URI; None for other stores and SQLite URI filenames
    (``sqlite:///file:<path>?mode=ro&uri=true``), which are used as given."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///file:"):
        return None
    return Path(uri[len("sqlite:///"):])


def _create_sqlite_store(path: Path) -> None:
    """Build a new MLflow SQLite store at ``path``, all or nothing.

    MLflow creates its tables and runs its migrations one by one; a process killed in the
    middle leaves a store that every later open refuses ("table ... already exists"). So the
    store is built under a temporary name in the same folder and renamed into place only when
    complete. Called with the store's setup lock held.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    building = path.parent / f".{path.name}.{os.getpid()}.creating"
    try:
        store = SqlAlchemyStore(f"sqlite:///{building}", (path.parent / "mlartifacts").as_uri())
        store.engine.dispose()  # close every connection before the file moves
        os.replace(building, path)
    finally:
        _remove_unfinished_stores(path)


def _remove_unfinished_stores(path: Path) -> None:
    """Remove the temporary stores (and their journals) of creators that were killed.
    Called with the setup lock held, so no creator is at work."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.creating*"):
        stale.unlink(missing_ok=True)


def _check_server_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast for an http(s) store nobody answers at: MLflow would retry for minutes."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "localhost", port), timeout=timeout_s).close()
    except OSError as error:
        raise TrackingUnavailableError(
            f"cannot reach the MLflow tracking server at {uri}: "
            f"{error.strerror or error} (start it, or set MLFLOW_TRACKING_URI to a reachable "
            "store)") from None


def _process_identity(pid: int) -> str:
    """``host:pid:start`` of a process; the start time (Linux) tells a reused pid apart."""
    import socket

    start = ""
    with contextlib.suppress(OSError, IndexError):
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    return f"{socket.gethostname()}:{pid}:{start}"


def _owner_is_gone(owner: str) -> bool:
    """True when the process named by an ``owner`` tag ran on this host and has ended."""
    import socket

    host, _, rest = owner.partition(":")
    pid, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's run: it may well be alive
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _process_identity(int(pid)) != owner  # the pid now belongs to another process


def _open_error(uri: str, error: BaseException) -> str:
    """The one line a stage prints when the store cannot be opened: the cause and what to do."""
    cause = root_cause(error)
    path = _sqlite_path(uri)
    if _is_lock_error(error):
        hint = f"another process held it locked for over {LOCK_WAIT_S:.0f} s; try again"
    elif "readonly" in cause or "no space left" in cause:
        hint = "make room or make it writable, or set MLFLOW_TRACKING_URI to another store"
    elif path is not None and path.is_file():
        hint = (f"it may be damaged, e.g. by a process killed while creating it: move it aside "
                f"(mv {path} {path}.broken) and re-run to start a new store, or set "
                "MLFLOW_TRACKING_URI to another store")
    else:
        hint = "set MLFLOW_TRACKING_URI to a reachable store"
    return f"cannot open the MLflow tracking store at {uri}: {cause} ({hint})"


def _quiet_mlflow() -> None:
    """Keep MLflow's, Alembic's and SQLAlchemy's own log lines (INFO on store creation, ERROR
    tracebacks when the store goes away) out of the stage's output: a failure is reported
    once, in one line, by ``Run``."""
    import logging

    import mlflow  # noqa: F401  (configures its loggers on import: set their level after it)

    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


# Runs this process has opened and not finished: closed as FAILED or KILLED if the stage dies.
_OPEN_RUNS: list["Run"] = []


def finish_open_runs(status: str) -> None:
    """End every run this process still holds open with ``status`` (FAILED, KILLED)."""
    for run in list(_OPEN_RUNS):
        run.finish(status)


class Run:
    """One MLflow run of a stage. Logging failures warn once and never raise."""

    def __init__(self, stage: str, model: str | None = None, parent_run_id: str | None = None,
                 run_name: str | None = None, run_id: str | None = None) -> None:
        """Open the store and start a run; ``run_id`` reopens that run when it still exists.

        Runs of this stage left RUNNING by a process of this machine that has since died
        (SIGKILL, a lost terminal) are closed as KILLED first.
        """
        self.stage = stage
        self._warned = False
        uri = tracking_uri()
        _quiet_mlflow()
        _check_server_reachable(uri)
        try:
            with _store_setup_lock(uri):
                run, experiment_id = _retry(self._open, uri, stage, model, parent_run_id,
                                            run_name, run_id)
        except Exception as error:
            raise TrackingUnavailableError(_open_error(uri, error)) from None
        self.run_id = run.info.run_id
        self.experiment_id = experiment_id
        _OPEN_RUNS.append(self)

    def _open(self, uri: str, stage: str, model: str | None, parent_run_id: str | None,
              run_name: str | None, run_id: str | None):
        import mlflow
        from mlflow.tracking import MlflowClient

        path = _sqlite_path(uri)
        if path is not None and not path.exists():
            _create_sqlite_store(path)
        elif path is not None:
            _remove_unfinished_stores(path)
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(
                    EXPERIMENT, artifact_location=(repo_root() / "mlartifacts").as_uri())
            except Exception as error:  # created meanwhile by a parallel run
                if _is_lock_error(error):
                    raise
                experiment_id = self.client.get_experiment_by_name(EXPERIMENT).experiment_id
        else:
            experiment_id = experiment.experiment_id
        if experiment is None or experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            # MLflow 3's UI then opens the experiment on its model-training pages (runs, charts,
            # models), not on the GenAI overview (traces, prompts).
            self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self._close_abandoned_runs(experiment_id, stage, keep=run_id)
        owner = _process_identity(os.getpid())
        tags = {"stage": stage, "git_commit": git_commit(), OWNER_TAG: owner}
        if model:
            tags["model"] = model
        if os.environ.get("DVC_EXP_NAME"):
            tags["dvc_exp"] = os.environ["DVC_EXP_NAME"]
        if parent_run_id and self._run_exists(parent_run_id):
            tags["mlflow.parentRunId"] = parent_run_id
        if run_id and self._run_exists(run_id):
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, OWNER_TAG, owner)
            return self.client.get_run(run_id), experiment_id
        # The tags mlflow.start_run would add (user, source, git commit): the UI's "User" and
        # "Source" columns.
        from mlflow.tracking.context.registry import resolve_tags

        return self.client.create_run(experiment_id, tags=resolve_tags(tags),
                                      run_name=run_name or stage), experiment_id

    def _close_abandoned_runs(self, experiment_id: str, stage: str, keep: str | None) -> None:
        """Mark KILLED the RUNNING runs of ``stage`` whose process on this machine has ended."""
        runs = self.client.search_runs(
            [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.stage = '{stage}'",
            max_results=1000)
        for run in runs:
            owner = run.data.tags.get(OWNER_TAG, "")
            if run.info.run_id != keep and owner and _owner_is_gone(owner):
                self.client.set_terminated(run.info.run_id, "KILLED")

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
                path = _sqlite_path(tracking_uri())
                cause = (f"the store {path} was removed" if path is not None and not path.exists()
                         else root_cause(error))
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
                    run_id: str | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._safely(self.client.log_batch, run_id or self.run_id, metrics=batch)

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

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._safely(self.client.log_dict, self.run_id, data, artifact_file)

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

    def log_pytorch_model(self, model_file: Path | str, name: str) -> None:
        """Log the model file's ``DiffusionModel`` in MLflow's PyTorch flavour as the run's
        model ``name`` (``runs:/<run id>/<name>``) and register it as a new version of the
        registered model ``name`` (``models:/<name>/<version>``).

        ``mlflow.pytorch.load_model`` then returns a ``DiffusionModel`` that samples (it is
        pickled: MLflow refuses it when ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``);
        ``diffusion.load_from_mlflow`` reads the weights-only ``model_file`` logged beside it.
        """
        self._safely(log_pytorch_model, self.run_id, self.experiment_id, model_file, name)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (once; later calls do nothing)."""
        if self in _OPEN_RUNS:
            _OPEN_RUNS.remove(self)
            self._safely(self.client.set_terminated, self.run_id, status)


def log_pytorch_model(run_id: str, experiment_id: str, model_file: Path | str, name: str) -> None:
    """Log the ``DiffusionModel`` of ``model_file`` (EMA weights, on the CPU) with
    ``mlflow.pytorch.log_model`` to the run ``run_id`` as the model ``name``, and register it as
    a new version of the registered model ``name``.

    Its signature is the network's: x_t float32 (N, 1, 28, 28) in, the noise estimate of the
    same shape out, with the timestep ``t`` as an inference parameter (``predict(x_t,
    params={"t": 500})`` calls ``model(x_t, t=500)``); the input example is two prior draws.
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
    import torch
    from mlflow.models import infer_signature

    import diffusion
    from diffusion.model import load

    def pinned(package: str) -> str:
        return f"{package}=={importlib.metadata.version(package).split('+')[0]}"

    logger = logging.getLogger("mlflow.pytorch")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.ERROR)  # the pickle-format warning: the weights-only file is beside it
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no bar in the stage's log
    model = load(model_file, device="cpu")
    t = model.process.n_T // 2
    x_t = model.process.prior((2, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    signature = infer_signature(x_t.numpy(), model(x_t, t).detach().numpy(), params={"t": t})
    try:
        mlflow.set_experiment(experiment_id=experiment_id)
        mlflow.pytorch.log_model(
            model, name=name, run_id=run_id, registered_model_name=name,
            signature=signature, input_example=(x_t.numpy(), {"t": t}),
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
