"""Data-parallel training under torchrun: two CPU processes with gloo, on tiny data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffusion import distributed
from tests.helpers import REPO, make_scratch_repo, stage_env

pytestmark = pytest.mark.slow  # two-process DDP runs

# Calls diffusion.training.train directly under torchrun; each rank dumps what it ended with.
TRAIN_SCRIPT = textwrap.dedent('''
    import hashlib, json, sys
    from dataclasses import asdict

    import torch

    from diffusion import distributed
    from diffusion.network import DenoiserCNN
    from diffusion.process import GammaProcess
    from diffusion.training import make_state, train
    from tests.helpers import train_config

    world, device = distributed.init(torch.device("cpu"))
    torch.manual_seed(world.rank)  # different initial weights: rank 0's must be broadcast
    images = (torch.rand(51, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    config = train_config(epochs=2, batch_size=8, lr=1e-3, ema_decay=0.9, holdout_subset=8, seed=3)
    state = make_state(DenoiserCNN((4, 4)), config, device)
    epochs_seen = []
    train(state, GammaProcess((1e-4, 0.02), 20, 0.001), images, images[:8], config,
          on_epoch=lambda s, record: epochs_seen.append(record.epoch))
    digest = hashlib.sha256()
    for part in (state.net, state.ema):
        for value in part.state_dict().values():
            digest.update(value.numpy().tobytes())
    with open(f"{sys.argv[1]}/rank{world.rank}.json", "w") as file:
        json.dump({"world_size": world.world_size, "hash": digest.hexdigest(), "step": state.step,
                   "callbacks": epochs_seen, "log": [asdict(r) for r in state.log]}, file)
    distributed.shutdown()
''')


def torchrun(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_without_torchrun_there_is_one_process_and_no_group(monkeypatch):
    for name in distributed.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    world, device = distributed.init(torch.device("cpu"))
    assert world == distributed.World(rank=0, world_size=1, local_rank=0)
    assert world.is_main and not world.parallel and device == torch.device("cpu")
    assert not torch.distributed.is_initialized()


def test_two_ranks_end_with_identical_weights_and_only_rank_0_runs_callbacks(tmp_path):
    script = tmp_path / "train_ranks.py"
    script.write_text(TRAIN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun(str(script), str(tmp_path), cwd=tmp_path, env=env)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["hash"] == ranks[1]["hash"]
    # 51 images over 2 ranks: 26 per rank (one wrapped around), 4 steps of <= 8 per epoch.
    assert ranks[0]["step"] == ranks[1]["step"] == 8
    assert ranks[0]["callbacks"] == [1, 2] and ranks[1]["callbacks"] == []
    losses = [[(r["train_loss"], r["heldout_loss"]) for r in rank["log"]] for rank in ranks]
    assert losses[0] == losses[1]  # reduced over ranks; rank 0's held-out loss shared
    assert all(0 < r["train_loss"] < 10 and 0 < r["heldout_loss"] < 10 for r in ranks[0]["log"])


@pytest.mark.parametrize("model", ["ddpm"])
def test_train_stage_under_torchrun_writes_one_set_of_outputs_and_one_mlflow_run(tmp_path, model):
    root = make_scratch_repo(tmp_path / "repo", {"train": {"epochs": 2}}, git=False)
    env = {**stage_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = torchrun("-m", "stages.train", model, cwd=root, env=env)
    assert result.stdout.count(f"train@{model}: 2 epochs") == 1  # the summary line: rank 0 only

    assert sorted(p.name for p in (root / "models" / model).iterdir()) == ["model.pt"]
    log = (root / "results" / "train" / model / "log.csv").read_text().splitlines()
    assert len(log) == 3 and log[0].startswith("epoch,")
    assert sorted(p.name for p in (root / "results" / "train" / model / "grids").iterdir()) == [
        "epoch_001.png", "epoch_002.png"]
    assert not list((root / ".resume").glob("*.pt"))  # the resume state was removed at the end

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("mnist-diffusion")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    assert runs[0].data.tags["stage"] == f"train@{model}"
    assert runs[0].data.params["world_size"] == "2"
    assert runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 2
