"""DVC stage train@<model>: train the seed's CNN under the model's noise process.

Writes ``models/<model>/model.pt`` (EMA weights, raw weights, config), ``models/<model>/run.json``
(the MLflow run id, so later stages log next to it), ``results/train/<model>/log.csv`` (per-epoch
train loss, held-out loss on the MNIST test set, images/s) and
``results/train/<model>/grids/epoch_NNN.png`` every ``train.grid_every`` epochs, drawn from the
same fixed noise each time so successive grids are comparable.

A killed run resumes from its last completed epoch on the next ``dvc repro``: the state is saved
after every epoch under ``.resume/`` (outside DVC's outputs), keyed by the stage's params and
input data, and removed once the stage finishes.

Launched by ``torchrun --nproc_per_node=N -m stages.train <model>``, the N processes train one
model data-parallel (diffusion/distributed.py: ``train.batch_size`` is per process, ``train.lr``
is unchanged); rank 0 alone writes the outputs and the resume state and logs to MLflow.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from diffusion import distributed
from diffusion.data import save_grid, to_uint8
from diffusion.io import ModelFileError, atomic_path, load_torch, save_json, save_torch
from diffusion.model import default_device, save_model
from diffusion.network import DenoiserCNN, resolve_precision
from diffusion.process import process_for_model
from diffusion.sampling import sample
from diffusion.training import (EpochRecord, NonFiniteLossError, TrainConfig, TrainState,
                                make_state, train)
from stages.common import RAW_DIR, EpochProgress, fail, mnist_on, model_argument, plain, stage_main
from stages.params import load_params_or_exit
from stages.tracking import Run, TrackingUnavailableError, repo_root

GRID_SEED_OFFSET = 2  # the grids' fixed noise comes from seed + 2 (seed + 1 is the held-out noise)


def resume_path(stage: str, params: dict) -> Path:
    """Where this stage keeps its resume state: keyed by its params and its input data."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for path in sorted(RAW_DIR.iterdir()):
        digest.update(path.name.encode())
        digest.update(hashlib.md5(path.read_bytes()).digest())
    return repo_root() / ".resume" / f"{stage}-{digest.hexdigest()[:16]}.pt"


def write_log(records: list[EpochRecord], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = [f.name for f in fields(EpochRecord)]
    writer.writerow(names)
    for record in records:
        row = asdict(record)
        writer.writerow([f"{row[n]:.6g}" if isinstance(row[n], float) else row[n] for n in names])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def read_resume_state(checkpoint: Path, device: torch.device, stage: str) -> dict:
    """The saved state of an interrupted run, or {} (none, or unusable: training starts over)."""
    if not checkpoint.exists():
        return {}
    try:
        return load_torch(checkpoint, map_location=device, expect=("epoch", "net", "ema"),
                          kind="resume state")
    except ModelFileError as error:
        print(f"warning: {stage} ignores its resume state: {error}", file=sys.stderr)
        return {}


def report_other_resume_states(stage: str, current: Path) -> None:
    """Say where this stage's resume states of other params (or data) are, and their size.

    They are kept, not removed: if the params change back, training resumes from them.
    """
    others = [path for path in current.parent.glob(f"{glob.escape(stage)}-*.pt") if path != current]
    if others:
        size = sum(path.stat().st_size for path in others)
        print(f"{stage}: {len(others)} resume state(s) of other params or data "
              f"({size / 2**20:.1f} MiB) in {current.parent}: "
              f"{', '.join(sorted(path.name for path in others))}; they resume if those params "
              "come back, delete them to free the space", flush=True)


class Silent:
    """Stands in for the MLflow run and the progress bar on ranks other than 0: does nothing."""

    run_id = experiment_id = None

    def log_params(self, *args, **kwargs) -> None:
        pass

    log_metrics = log_artifact = finish = epoch_done = close = log_params


@stage_main
def main() -> None:
    model = model_argument("train")
    stage = f"train@{model}"
    params = plain(load_params_or_exit(stage))
    seed, train_params = params["seed"], params["train"]
    config = TrainConfig(
        epochs=train_params["epochs"], batch_size=train_params["batch_size"],
        lr=train_params["lr"], ema_decay=train_params["ema_decay"],
        holdout_subset=train_params["holdout_subset"], seed=seed,
        compile=train_params["compile"])
    net_config = {"hidden": list(params["net"]["hidden"]), "activation": params["net"]["activation"]}
    process = process_for_model(model, params[model])
    models_dir, results_dir = Path("models") / model, Path("results/train") / model
    grids_dir = results_dir / "grids"
    checkpoint = resume_path(stage, params)

    world, device = distributed.init(default_device())
    config.precision = resolve_precision(params["precision"], device)
    torch.manual_seed(seed)  # the network's initial weights
    state = make_state(DenoiserCNN(tuple(net_config["hidden"]), net_config["activation"]),
                       config, device)
    saved = read_resume_state(checkpoint, device, stage)
    resumed = bool(saved)
    if resumed:
        state.load_state_dict(saved)
    try:
        run = Run(stage, model, run_id=saved.get("run_id")) if world.is_main else Silent()
    except TrackingUnavailableError as error:
        fail(str(error))
    if world.is_main:
        report_other_resume_states(stage, checkpoint)
    if not resumed:
        run.log_params({"model": model, "seed": seed, "data.train_subset": params["data"]["train_subset"],
                        "net": net_config, model: params[model], "train": train_params,
                        "precision": params["precision"], "precision_resolved": config.precision,
                        "device": str(device), "world_size": world.world_size})

    train_images, _ = mnist_on(device, train=True, subset=params["data"]["train_subset"])
    test_images, _ = mnist_on(device, train=False)
    grids: dict[int, torch.Tensor] = {int(k): v for k, v in saved.get("grids", {}).items()}
    if world.is_main:
        print(f"{stage}: {config.precision} on {device} (precision: {params['precision']})",
              flush=True)
        if resumed:
            print(f"{stage}: resuming from epoch {state.epoch} ({checkpoint})", flush=True)
        for epoch, images in grids.items():  # DVC removed the outputs before re-running the stage
            save_grid(images, grids_dir / f"epoch_{epoch:03d}.png")
        write_log(state.log, results_dir / "log.csv")

    grid_noise = process.prior(
        (train_params["grid_size"], 1, 28, 28), device=device,
        generator=torch.Generator(device).manual_seed(seed + GRID_SEED_OFFSET))
    progress = EpochProgress(config.epochs, state.epoch, stage) if world.is_main else Silent()

    def on_epoch(state: TrainState, record: EpochRecord) -> None:
        progress.epoch_done(record.epoch, record.train_loss, record.heldout_loss,
                            record.images_per_s)
        write_log(state.log, results_dir / "log.csv")
        run.log_metrics({"train_loss": record.train_loss, "heldout_loss": record.heldout_loss,
                         "images_per_s": record.images_per_s}, step=record.epoch)
        if record.epoch % train_params["grid_every"] == 0 or record.epoch == config.epochs:
            generator = torch.Generator(device).manual_seed(seed + GRID_SEED_OFFSET + 1)
            images = to_uint8(sample(state.ema, process, grid_noise.shape[0], device=device,
                                     generator=generator, x_T=grid_noise,
                                     precision=config.precision)).cpu()
            grids[record.epoch] = images
            path = grids_dir / f"epoch_{record.epoch:03d}.png"
            save_grid(images, path)
            run.log_artifact(path, "grids")

    def save_resume_state(state: TrainState) -> None:
        save_torch({**state.state_dict(), "run_id": run.run_id,
                    "grids": {str(k): v for k, v in grids.items()}}, checkpoint)

    try:
        train(state, process, train_images, test_images, config, on_epoch=on_epoch,
              on_checkpoint=save_resume_state)
    except KeyboardInterrupt:
        progress.close()
        run.finish("KILLED")
        # The interrupt may land between an epoch's end and its checkpoint: report the file's epoch.
        saved_epoch = read_resume_state(checkpoint, torch.device("cpu"), stage).get("epoch", 0)
        if saved_epoch:
            fail(f"{stage} interrupted; its state after epoch {saved_epoch} is saved in {checkpoint}. "
                 f"Run `dvc repro {stage}` to resume from there.", status=130)
        fail(f"{stage} interrupted during epoch 1, before any state was saved; "
             f"`dvc repro {stage}` starts it again.", status=130)
    except NonFiniteLossError as error:
        progress.close()
        run.finish("FAILED")
        fail(f"{stage}: {error}")
    progress.close()
    if not world.is_main:  # rank 0 writes the outputs
        distributed.shutdown()
        return

    save_model(models_dir / "model.pt", state.net, state.ema, process,
               {"model": model, "net": net_config, "seed": seed,
                "train_subset": params["data"]["train_subset"], "train": train_params,
                "precision": config.precision, "epochs_trained": state.epoch})
    save_json({"run_id": run.run_id, "experiment_id": run.experiment_id}, models_dir / "run.json")
    run.log_artifact(models_dir / "model.pt", "model_file")
    run.log_pytorch_model(models_dir / "model.pt")  # runs:/<id>/model, mlflow.pytorch flavour
    run.log_artifact(results_dir / "log.csv")
    run.finish()
    checkpoint.unlink(missing_ok=True)
    last = state.log[-1]
    print(f"{stage}: {state.epoch} epochs, train loss {last.train_loss:.4f}, "
          f"held-out loss {last.heldout_loss:.4f} -> {models_dir / 'model.pt'}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
