"""notebooks/mnist_diffusion.ipynb runs top to bottom on the CPU in a scratch copy of the repo.

The notebook is executed with nbclient (kernel python3) and ``MNIST_DIFFUSION_TINY=1``, so its
own parameter cell picks the tiny run; the scratch repo starts from the project's real
params.yaml. MNIST comes from the session's verified files through ``data.local_dir`` (DVC
empties ``data/MNIST/raw`` before the download stage runs, so copying the files there alone
would not keep the stage off the network).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest
import yaml
from nbclient import NotebookClient

from tests.helpers import REPO, init_git_and_dvc, make_scratch_repo

pytestmark = pytest.mark.slow  # executes the notebook and its pipeline run

NOTEBOOK = REPO / "notebooks" / "mnist_diffusion.ipynb"


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.execution_count is None and cell.outputs == []
    assert notebook.metadata.kernelspec.name == "python3"


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory, mnist_raw_dir: Path):
    root = make_scratch_repo(tmp_path_factory.mktemp("notebook") / "repo", mnist_dir=mnist_raw_dir,
                             git=False)
    params = yaml.safe_load((REPO / "params.yaml").read_text())  # the real defaults, not TINY
    params["data"]["local_dir"] = str(mnist_raw_dir)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "notebooks").mkdir()
    shutil.copy(NOTEBOOK, root / "notebooks" / NOTEBOOK.name)
    init_git_and_dvc(root)

    mp = pytest.MonkeyPatch()
    for name in [k for k in os.environ if k.startswith(("MLFLOW_", "DVC_"))]:
        mp.delenv(name)
    mp.delenv("PYTHONPATH", raising=False)  # the kernel imports the scratch copy, not this repo
    mp.setenv("MNIST_DIFFUSION_TINY", "1")
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root.parent / 'mlflow.db'}")
    mp.setenv("OMP_NUM_THREADS", "1")
    mp.setenv("DVC_NO_ANALYTICS", "1")
    notebook = nbformat.read(root / "notebooks" / NOTEBOOK.name, as_version=4)
    try:
        # timeout is per cell; one cell runs the whole tiny pipeline (dvc exp run)
        NotebookClient(notebook, kernel_name="python3", timeout=900,
                       resources={"metadata": {"path": str(root / "notebooks")}}).execute()
    finally:
        mp.undo()
    return root, notebook


def outputs_text(cell) -> str:
    return "".join(out.get("text", "") + json.dumps(out.get("data", {})) for out in cell.outputs)


def test_notebook_runs_the_pipeline_and_shows_its_outputs(executed):
    root, notebook = executed
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
    text = "\n".join(outputs_text(cell) for cell in code)
    assert "tiny (MNIST_DIFFUSION_TINY=1)" in text
    assert "Running stage 'train@ddgm'" in text and "Running stage 'plot'" in text
    assert "models:/ddgm@newest samples the same digits as models/ddgm/model.pt: True" in text
    assert "ddgm: unconditional (net.classes = 0): train with -S net.classes=10" in text

    # the tiny overrides went through `dvc exp run -S` into params.yaml
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["data"]["train_subset"] == 256 and params["ddgm"]["n_T"] == 10
    for path in ("results/plot/loss_curves.png", "results/plot/samples.png",
                 "results/plot/degradation.png", "results/sweep/table.md",
                 "results/evaluate/ddpm/metrics.json", "results/evaluate/ddgm/metrics.json",
                 "models/ddpm/model.pt", "models/ddgm/model.pt"):
        assert (root / path).is_file(), path
    images = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 7  # 5 pipeline figures + the 2 API figures
    markdown = [out["data"]["text/markdown"] for cell in code for out in cell.outputs
                if "text/markdown" in out.get("data", {})]
    assert any("| quality.fid |" in m for m in markdown)
