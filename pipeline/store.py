"""The MLflow store under the stages' runs, made to survive what happens to a shared machine.

``pipeline.tracking`` logs; this module makes opening the store safe:
- which store (``tracking_uri``: ``MLFLOW_TRACKING_URI``, else SQLite at the repo root, also
  from DVC's temporary experiment copies) and a fast, one-line failure for a server nobody
  answers at (``check_reachable``);
- a new SQLite store is built under a temporary name and renamed into place, under a
  machine-wide lock, so a process killed mid-creation leaves no half-built store
  (``open_client``);
- 'database is locked' answers are retried for up to ``LOCK_WAIT_S`` (``retry``);
- each run carries a readable ``process`` tag (pid, host, start time), so a later stage can
  close as KILLED the runs whose process has died (``process_is_gone``);
- errors are reduced to their innermost cause in one line (``root_cause``, ``open_error``).
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import hashlib
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_WAIT_S = 60.0  # how long to wait for a store another process holds locked (SQLite: one writer)
PROCESS_TAG = "process"  # "pid 4446 on host vm, started 2026-12-03 07:30:01 UTC"


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store could not be opened."""


def repo_root() -> Path:
    """The repository root: DVC_ROOT (outside DVC's temporary experiment copies) or the cwd.

    ``dvc exp run --temp`` and queued experiments run in a copy under ``.dvc/tmp/exps/``:
    their runs go to the store of the repo that holds that copy, so every experiment lands in
    one place.
    """
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


# ---------------------------------------------------------------- errors in one line
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


def is_lock_error(error: BaseException) -> bool:
    return any("locked" in text.lower() or "busy" in text.lower() for text in _messages(error))


def retry(call, *args, wait_s: float = LOCK_WAIT_S, **kwargs):
    """Retry ``call`` while the SQLite store answers 'database is locked', for up to ``wait_s``."""
    deadline, delay = time.monotonic() + wait_s, 0.1
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as error:
            if not is_lock_error(error) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def open_error(uri: str, error: BaseException) -> str:
    """The one line a stage prints when the store cannot be opened: the cause and what to do."""
    cause = root_cause(error)
    path = sqlite_path(uri)
    if is_lock_error(error):
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


def quiet_mlflow() -> None:
    """Keep MLflow's, Alembic's and SQLAlchemy's own log lines (INFO on store creation, ERROR
    tracebacks when the store goes away) out of the stage's output: a failure is reported
    once, in one line, by the run."""
    import mlflow  # noqa: F401  (configures its loggers on import: set their level after it)

    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


# ---------------------------------------------------------------- opening the store
def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast for an http(s) store nobody answers at: MLflow would retry for minutes."""
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


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///<path>`` URI; None for other stores and SQLite URI filenames
    (``sqlite:///file:<path>?mode=ro&uri=true``), which are used as given."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:///file:"):
        return None
    return Path(uri[len("sqlite:///"):])


@contextlib.contextmanager
def setup_lock(uri: str) -> Iterator[None]:
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


def _create_sqlite_store(path: Path) -> None:
    """Build a new MLflow SQLite store at ``path``, all or nothing.

    MLflow creates its tables and runs its migrations one by one; a process killed in the
    middle leaves a store that every later open refuses ("table ... already exists"). So the
    store is built under a temporary name in the same folder and renamed into place only when
    complete. Called with the setup lock held.
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


def open_client(uri: str):
    """An ``MlflowClient`` on ``uri``, creating a SQLite store whole if there is none. Call
    with ``setup_lock(uri)`` held."""
    import mlflow
    from mlflow.tracking import MlflowClient

    path = sqlite_path(uri)
    if path is not None and not path.exists():
        _create_sqlite_store(path)
    elif path is not None:
        _remove_unfinished_stores(path)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


# ---------------------------------------------------------------- runs of dead processes
def process_identity(pid: int) -> str:
    """A readable identity of a process: pid, host and start time (which tells a reused pid
    apart). The start time is read from /proc (Linux); elsewhere it is left out."""
    started = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        moment = datetime.datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"),
                                                 datetime.timezone.utc)
        started = f", started {moment:%Y-%m-%d %H:%M:%S} UTC"
    return f"pid {pid} on host {socket.gethostname()}{started}"


def process_is_gone(identity: str) -> bool:
    """True when the process a ``process`` tag names ran on this host and has ended."""
    match = re.fullmatch(r"pid (\d+) on host (\S+?)(, started .*)?", identity)
    if match is None or match.group(2) != socket.gethostname():
        return False  # another machine's run (or an unknown tag): it may well be alive
    pid = int(match.group(1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return process_identity(pid) != identity  # the pid now belongs to another process


def close_abandoned_runs(client, experiment_id: str, stage: str, keep: str | None) -> None:
    """Mark KILLED the RUNNING runs of ``stage`` whose process on this machine has ended."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.stage = '{stage}'",
        max_results=1000)
    for run in runs:
        identity = run.data.tags.get(PROCESS_TAG, "")
        if run.info.run_id != keep and identity and process_is_gone(identity):
            client.set_terminated(run.info.run_id, "KILLED")
