"""DVC stage train@<model>: train the model's network under its noise process.

Writes ``models/<model>/model.pt`` (EMA weights, raw weights, config) and, through
``diffusion.training.TrainLoop``, ``results/train/<model>/log.csv`` and ``grids/epoch_NNN.png``.
A killed run resumes from its last completed epoch on the next ``dvc repro``: the state (and
the MLflow run id) is saved after every epoch under ``.resume/``, outside DVC's outputs, keyed
by the stage's params and input data, and removed at the end. Under
``torchrun --nproc_per_node=N -m stages.train <model>`` the N processes train one model
data-parallel (``train.batch_size`` per process); rank 0 alone writes and logs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffusion import distributed
from diffusion.data import default_device, grid_image
from diffusion.model import load, save_model
from diffusion.network import make_network, resolve_precision
from diffusion.process import make_process
from diffusion.training import Checkpoint, EpochRecord, NonFiniteLossError, TrainConfig, TrainLoop
from pipeline.common import (EpochProgress, Silent, fail, log_mnist, mnist_on, model_argument,
                           open_run, stage_main, warn)
from pipeline.params import load_params_or_exit
from pipeline.paths import RAW_DIR, RESUME_DIR, model_file, train_dir
from pipeline.store import repo_root


def checkpoint_for(stage: str, params: dict) -> Checkpoint:
    """The stage's resume state, keyed by its params and the MNIST files, so that a state
    resumes only the run that made it."""
    return Checkpoint.keyed(repo_root() / RESUME_DIR, stage, params, RAW_DIR.iterdir())


def epoch_metrics(record: EpochRecord) -> dict[str, float]:
    return {"train_loss": record.train_loss, "heldout_loss": record.heldout_loss,
            "images_per_s": record.images_per_s}


@stage_main
def main() -> None:
    model = model_argument("train")
    stage = f"train@{model}"
    params = load_params_or_exit(stage, build_process=make_process)
    world, device = distributed.init(default_device())
    config = TrainConfig(**params.train.as_dict(), seed=params.seed, data_scale=params.data.scale,
                         precision=resolve_precision(params.precision, device))
    checkpoint = checkpoint_for(stage, params.as_dict())
    torch.manual_seed(config.seed)  # the network's initial weights
    loop = TrainLoop(make_network(params.net.as_dict()), make_process(params[model].as_dict()), config, device,
                     train_dir(model), checkpoint=checkpoint, warn=warn)
    run = open_run(stage, model, run_id=loop.extra.get("run_id")) if world.is_main else Silent()
    loop.extra["run_id"] = run.run_id
    if world.is_main:
        if others := checkpoint.report_others():
            print(others, flush=True)
        print(f"{stage}: {config.precision} on {device} (precision: {params.precision})",
              flush=True)
        if loop.resumed:
            print(f"{stage}: resuming from epoch {loop.state.epoch} ({checkpoint.path})", flush=True)
    if not loop.resumed:
        run.log_params({"model": model, **params.as_dict(), "precision_resolved": config.precision,
                        "device": str(device), "world_size": world.world_size})
        if world.is_main:
            log_mnist(run, train=True, used=params.data.train_subset, context="training")
            log_mnist(run, train=False, used=config.holdout_subset, context="held-out loss")
    train_images, train_labels = mnist_on(device, train=True, subset=params.data.train_subset)
    test_images, test_labels = mnist_on(device, train=False)
    if not params.net.classes:  # an unconditional network is not given the digits
        train_labels = test_labels = None
    progress = EpochProgress(config.epochs, loop.state.epoch, stage) if world.is_main else Silent()

    def report(record, grid: Path | None) -> None:
        progress.epoch_done(record.epoch, record.train_loss, record.heldout_loss,
                            record.images_per_s)
        if record.epoch < config.epochs:  # the last epoch's go to the logged model, below
            run.log_metrics(epoch_metrics(record), step=record.epoch)
        if grid is not None:  # the UI's image slider: the same noise, epoch after epoch
            run.log_image(grid_image(loop.grids[record.epoch]).numpy(), key="samples",
                          step=record.epoch)

    with run.system_metrics(resume=loop.resumed):  # training and the model's logging
        try:
            state = loop.run(train_images, test_images, report=report,
                             train_labels=train_labels, test_labels=test_labels)
        except KeyboardInterrupt:  # stage_main ends the run KILLED, a failure FAILED
            progress.close()
            # The interrupt may land between an epoch's end and its checkpoint: say the file's epoch.
            if saved := checkpoint.saved_epoch():
                fail(f"{stage} interrupted; its state after epoch {saved} is saved in "
                     f"{checkpoint.path}. Run `dvc repro {stage}` to resume from there.", status=130)
            fail(f"{stage} interrupted during epoch 1, before any state was saved; "
                 f"`dvc repro {stage}` starts it again.", status=130)
        except NonFiniteLossError as error:
            progress.close()
            fail(f"{stage}: {error}")
        progress.close()
        if world.is_main:  # rank 0 writes the outputs
            path = model_file(model)
            save_model(path, state.net, state.ema, loop.process,
                       {"model": model, "net": params.net.as_dict(), "seed": config.seed,
                        "train_subset": params.data.train_subset, "train": params.train.as_dict(),
                        "data_scale": config.data_scale,
                        "precision": config.precision, "epochs_trained": state.epoch})
            run.log_artifact(path, "model_file")
            model_id = run.log_pytorch_model(load(path, device="cpu"), path, model)
            last = state.log[-1]  # also the logged model's own figures (its page's "Metrics")
            run.log_metrics(epoch_metrics(last), step=last.epoch, model_id=model_id)
            run.log_artifact(loop.out_dir / "log.csv")
    if world.is_main:
        run.finish()
        checkpoint.remove()
        print(f"{stage}: {state.epoch} epochs, train loss {last.train_loss:.4f}, "
              f"held-out loss {last.heldout_loss:.4f} -> {path}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
