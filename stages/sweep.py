"""DVC stage sweep: FID against the number of sampling steps, for every model and sampler.

The DDGM paper's table (Nachmani, San Roman and Wolf 2021: FID for 10 ... 1000 steps, rows of
Gaussian or Gamma noise with the ancestral and the DDIM sampler) on MNIST, with the classifier
stage's features in place of Inception-v3 (``diffusion.evaluation.sweep``): every cell draws
``sweep.n_samples`` images from the same seed and scores them against as many random test
images, beside the floor. A step count above a model's n_T runs its n_T steps (said once).
Conditional models (``net.classes = 10``) are asked for every digit in equal numbers, once per
classifier-free guidance weight of ``sweep.guidance`` (rows ``<model>_w<w>_<sampler>`` for
w > 0), and their cells add the conditional accuracy.
Writes to ``results/sweep/``: ``table.json`` (the FIDs; DVC metrics), ``cells.json`` (every
score of every cell), ``fid.csv`` (DVC plot data), ``table.md`` and ``fid_vs_steps.png``.
A killed sweep (hours at 1000 steps on a CPU) resumes on the next ``dvc repro``: the cells done
so far and the MLflow run id are saved after every cell under ``.resume/``, outside DVC's
outputs, keyed like train's resume state by the stage's params and input files (models,
classifier, MNIST), and the cell being drawn after every batch (beside it, ``.part.pt``), so
a kill loses at most one batch; both are removed at the end.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from diffusion import report
from diffusion.classifier import load_classifier
from diffusion.evaluation import PartialCell, Reference, column, sweep
from diffusion.io import ModelFileError, load_torch, save_json, save_text, save_torch
from diffusion.metrics import CONDITIONAL_ACCURACY, SCORES
from diffusion.model import load
from diffusion.network import resolve_precision
from diffusion.training import Checkpoint
from pipeline.common import fail, load_or_exit, mnist_reference, open_run, stage_main
from pipeline.params import load_params_or_exit
from pipeline.paths import CLASSIFIER_FILE, RAW_DIR, RESUME_DIR, SWEEP_DIR, model_file
from pipeline.store import repo_root


def resume_file(params: dict, inputs: list[Path]) -> Path:
    """Where the sweep's finished cells are kept until it ends: named, as train's resume
    state is (``Checkpoint.keyed``), after a digest of the stage's params (those dvc.yaml
    declares for it) and input files, so that only the same sweep of the same models picks
    them up."""
    files = [*inputs, *RAW_DIR.iterdir()]
    return Checkpoint.keyed(repo_root() / RESUME_DIR, "sweep", params, files).path.with_suffix(".json")


def load_resume(path: Path) -> dict:
    """The saved ``{"run_id", "cells"}`` of a killed sweep, or {} when there is none or it
    is unreadable (said; the sweep then starts over)."""
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
        if isinstance(state, dict) and isinstance(state.get("cells"), dict):
            return state
        problem = "not a sweep resume state"
    except (OSError, ValueError) as error:
        problem = str(error)
    print(f"sweep: ignores its resume state {path}: {problem}", file=sys.stderr)
    return {}


def partial_file(resume: Path) -> Path:
    """Where the cell being drawn is kept between batches, beside the finished cells."""
    return resume.with_suffix(".part.pt")


def save_partial(cell: PartialCell, device: torch.device, path: Path) -> None:
    save_torch({**asdict(cell), "device": device.type}, path)


def load_partial(path: Path, device: torch.device, n: int, batch_size: int) -> PartialCell | None:
    """The cell a killed sweep was drawing, or None when there is none or it does not fit this
    sweep (said; the cell then starts over)."""
    if not path.is_file():
        return None
    try:
        keys = [f.name for f in fields(PartialCell)]
        state = load_torch(path, expect=(*keys, "device"), kind="sweep cell")
        drawn = len(state["images"])
        if state["device"] != device.type:  # a generator's state is its device's own
            problem = f"drawn on {state['device']}, this sweep runs on {device.type}"
        elif not (0 < drawn < n and drawn % batch_size == 0):
            problem = f"{drawn} images, not whole batches of {batch_size} below {n}"
        else:
            return PartialCell(**{k: state[k] for k in keys})
    except ModelFileError as error:
        problem = str(error)
    print(f"sweep: ignores its part-drawn cell {path}: {problem}", file=sys.stderr)
    return None


@stage_main
def main() -> None:
    params = load_params_or_exit("sweep")
    settings, seed, names = params.sweep, params.seed, params.models
    n, batch_size, eta = settings.n_samples, settings.batch_size, settings.eta
    needed = [CLASSIFIER_FILE, *(model_file(m) for m in names)]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        fail(f"missing {', '.join(missing)}: run `dvc repro` for the stages that make them")

    models = {m: load_or_exit(load, model_file(m), precision=params.precision)
              for m in names}
    device = next(iter(models.values())).device
    resume = resume_file(params.as_dict(), needed)
    state = load_resume(resume)
    done = state.get("cells", {})
    partial = load_partial(partial_file(resume), device, n, batch_size) if state else None
    if done or partial:
        print(f"sweep: resuming with {sum(map(len, done.values()))} cells done"
              + (f" and {len(partial.images)} of {n} images of {partial.column} at "
                 f"{partial.steps} steps" if partial else "") + f" ({resume})", flush=True)
    # a failure below ends it FAILED (stage_main); a resumed sweep reopens its run
    run = open_run("sweep", run_id=state.get("run_id"))
    precision = resolve_precision(params.precision, device)
    run.log_params({"seed": seed, "models": names, "sweep": settings.as_dict(),
                    "precision": params.precision, "precision_resolved": precision})
    for name, model in models.items():
        if not model.classes and any(settings.guidance):
            fail(f"sweep.guidance = {settings.guidance} is not allowed for {name}: it is "
                 "unconditional (trained with net.classes = 0); use [0.0], or train with "
                 "net.classes = 10", status=2)
        if max(settings.steps) > model.process.n_T:
            print(f"sweep: step counts above {name}'s n_T = {model.process.n_T} are run as "
                  f"{model.process.n_T} steps", file=sys.stderr)
    test_images = mnist_reference(device, train=False, n=n, seed=seed)
    train_images = mnist_reference(device, train=True, n=n, seed=seed)
    if min(len(test_images), len(train_images)) < n:
        fail(f"sweep.n_samples = {n} but {RAW_DIR} holds only {len(test_images)} test and "
             f"{len(train_images)} training images: lower sweep.n_samples", status=2)
    classifier = load_or_exit(load_classifier, CLASSIFIER_FILE, device)
    reference = Reference.of(classifier, test_images, train_images, seed=seed,
                             batch_size=batch_size)
    floor = {k: reference.floor[k] for k in SCORES}
    # sweep_floor_fid: the floor at sweep.n_samples (evaluate's floor_fid is at its own count)
    run.log_metrics({"sweep_floor_fid": floor["fid"]})

    def log_cell(column: str, count: int, cell: dict[str, float]) -> None:
        accuracy = cell.get(CONDITIONAL_ACCURACY)
        metrics = {f"fid_{column}": cell["fid"]}  # FID against steps
        if accuracy is not None:
            metrics[f"{CONDITIONAL_ACCURACY}_{column}"] = accuracy
        run.log_metrics(metrics, step=count)
        print(f"sweep: {column:16s} {count:5d} steps  FID {cell['fid']:8.2f}  "
              + (f"accuracy {accuracy:.3f}  " if accuracy is not None else "")
              + f"{cell['seconds']:7.1f} s", flush=True)

    saved = {c: dict(cells) for c, cells in done.items()}

    def on_cell(column: str, count: int, cell: dict[str, float]) -> None:
        saved.setdefault(column, {})[str(count)] = cell
        save_json({"run_id": run.run_id, "cells": saved}, resume)
        partial_file(resume).unlink(missing_ok=True)
        log_cell(column, count, cell)

    def on_batch(cell: PartialCell) -> None:
        if not resume.is_file():  # the part is used only beside the run it belongs to
            save_json({"run_id": run.run_id, "cells": saved}, resume)
        save_partial(cell, device, partial_file(resume))

    if run.run_id != state.get("run_id"):  # the killed run is gone: its cells go in this one
        for c, cells in done.items():
            for count, cell in cells.items():
                log_cell(c, int(count), cell)

    with run.system_metrics():
        table = sweep(models, reference, steps=settings.steps,
                      samplers=settings.samplers, n=n, eta=eta,
                      clip_x0=settings.clip_x0, prior=settings.prior, seed=seed,
                      batch_size=batch_size, guidance=settings.guidance, on_cell=on_cell,
                      done=done, partial=partial, on_batch=on_batch)

    rows = {column(m, s, w): report.label(m, models[m].process.name, s, eta, settings.clip_x0, w)
            for s in settings.samplers for m in models for w in settings.guidance}  # paper order
    steps = sorted({int(s) for cells in table.values() for s in cells})
    save_json({"n_samples": n, "floor_fid": floor["fid"],
               **{c: {s: cell["fid"] for s, cell in cells.items()} for c, cells in table.items()}},
              SWEEP_DIR / "table.json")
    save_json({"n_samples": n, "floor": floor, **table}, SWEEP_DIR / "cells.json")
    cells = [(c, int(s), cell) for c, by_steps in table.items() for s, cell in by_steps.items()]
    scores = (*SCORES, *([CONDITIONAL_ACCURACY] if all(CONDITIONAL_ACCURACY in cell
                                                        for _, _, cell in cells) else []))
    run.log_table({"row": [rows[c] for c, _, _ in cells], "steps": [s for _, s, _ in cells],
                   **{k: [cell[k] for _, _, cell in cells] for k in (*scores, "seconds")}},
                  "cells_table.json")
    save_text(report.csv_text(report.fid_rows(table, list(rows), steps), list(rows)),
              SWEEP_DIR / "fid.csv")
    save_text(report.markdown_report(table, rows, steps, floor, n, report.device_label(device)),
              SWEEP_DIR / "table.md")
    report.save_figure(report.fid_figure(table, rows, steps, floor["fid"], n),
                       SWEEP_DIR / "fid_vs_steps.png")
    for name in ("table.json", "cells.json", "fid.csv", "table.md", "fid_vs_steps.png"):
        run.log_artifact(SWEEP_DIR / name)
    run.finish()
    resume.unlink(missing_ok=True)
    partial_file(resume).unlink(missing_ok=True)
    print(f"sweep: {sum(map(len, table.values()))} cells on {n} samples, {precision} "
          f"(floor FID {floor['fid']:.2f}) -> {SWEEP_DIR}")


if __name__ == "__main__":
    main()
