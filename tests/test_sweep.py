"""The sweep stage: its table functions on hand data, and the whole stage on tiny real inputs.

The stage runs in-process in a temporary folder holding two untrained tiny models (n_T = 10), an
untrained tiny classifier, random-pixel MNIST files, params.yaml with tiny sweep values, the
project's dvc.yaml and its own MLflow store.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from diffusion import evaluation, report
from diffusion.classifier import MnistClassifier, save_classifier
from diffusion.metrics import SCORES
from diffusion.model import DiffusionModel, save_model
from diffusion.network import LabelEmbedding, make_network
from diffusion.process import GammaProcess, GaussianProcess
from pipeline.params import load_params
from stages import sweep
from tests.helpers import REPO, TINY_PARAMS, merge, write_synthetic_mnist

STEPS = [1, 3, 10]
COLUMNS = ["ddpm_ancestral", "ddgm_ancestral", "ddpm_ddim", "ddgm_ddim"]
OUTPUTS = ["table.json", "cells.json", "fid.csv", "table.md", "fid_vs_steps.png"]
TINY = {**TINY_PARAMS,  # the pipeline tests' tiny values (n_T = 10), with this sweep
        "sweep": {"steps": STEPS, "samplers": ["ancestral", "ddim"], "n_samples": 16, "eta": 0.0,
                  "batch_size": 8}}
N_TEST = 32


def build_inputs(root: Path, ddgm_n_T: int = 10, sweep_params: dict | None = None,
                 net_config: dict | None = None, options: dict | None = None) -> Path:
    """A folder the stage can run in (see the module docstring); ``net_config`` (default: a tiny
    CNN) and ``options`` (per model: ``schedule``, ``target``) change the saved models."""
    root.mkdir(parents=True, exist_ok=True)
    write_synthetic_mnist(root / "data" / "MNIST" / "raw", n_train=64, n_test=N_TEST)
    net_config = net_config or {"hidden": [8, 8], "activation": "gelu"}
    options = options or {}
    processes = {"ddpm": GaussianProcess((1e-4, 0.02), 10, **options.get("ddpm", {})),
                 "ddgm": GammaProcess((1e-4, 0.02), ddgm_n_T, 0.001, **options.get("ddgm", {}))}
    for i, (name, process) in enumerate(processes.items()):
        torch.manual_seed(i)
        net = make_network(net_config)
        for module in net.modules():  # a conditional net's digits, as if trained: not all zero
            if isinstance(module, LabelEmbedding) and module.table is not None:
                torch.nn.init.normal_(module.table.weight)
        save_model(root / "models" / name / "model.pt", net, net, process,
                   {"model": name, "net": net_config})
    torch.manual_seed(0)
    save_classifier(MnistClassifier(channels=(4, 8), feature_dim=16).eval(),
                    root / "models" / "classifier" / "classifier.pt")
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                   merge(TINY, {"sweep": sweep_params or {}}))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    return root


def run_stage(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    sweep.main()


def mlflow_runs(root: Path) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist-diffusion")
    return client, client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    root = build_inputs(tmp_path_factory.mktemp("sweep"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_stage(root, monkeypatch)
    return root


# ------------------------------------------------------------------ table functions, hand data
HAND: report.Table = {
    "ddpm_ancestral": {"10": {"fid": 12.5, "seconds": 1.0}, "100": {"fid": 3.25, "seconds": 9.0}},
    "ddgm_ddim": {"10": {"fid": 7.0, "seconds": 2.0}},  # 100 steps skipped
}
HAND_ROWS = {"ddpm_ancestral": "Gaussian (ddpm), ancestral (DDPM)",
             "ddgm_ddim": "Gamma (ddgm), DDIM eta=0"}


def test_column_and_label_name_the_paper_rows():
    assert evaluation.column("ddgm", "ddim") == "ddgm_ddim"
    assert evaluation.column("ddgm", "ddim", 0.5) == "ddgm_w0.5_ddim"
    assert report.label("ddgm", "gamma", "ddim", 0.0) == "Gamma (ddgm), DDIM eta=0"
    assert report.label("ddpm", "gaussian", "ancestral", 0.5) == "Gaussian (ddpm), ancestral (DDPM)"


def test_fid_rows_have_one_row_per_step_count_and_blank_skipped_cells():
    rows = report.fid_rows(HAND, list(HAND_ROWS), [10, 100])
    assert rows == [{"steps": 10, "ddpm_ancestral": 12.5, "ddgm_ddim": 7.0},
                    {"steps": 100, "ddpm_ancestral": 3.25, "ddgm_ddim": ""}]
    text = report.csv_text(rows, list(HAND_ROWS))
    assert text.splitlines() == ["steps,ddpm_ancestral,ddgm_ddim", "10,12.5,7.0", "100,3.25,"]


def test_markdown_table_has_a_line_per_row_and_a_column_per_step_count():
    lines = report.markdown_table(HAND, HAND_ROWS, [10, 100]).splitlines()
    assert lines[0] == "| | 10 steps | 100 steps |"
    assert lines[2] == "| Gaussian (ddpm), ancestral (DDPM) | 12.50 | 3.25 |"
    assert lines[3] == "| Gamma (ddgm), DDIM eta=0 | 7.00 | — |"
    seconds = report.markdown_table(HAND, HAND_ROWS, [10, 100], "seconds", 1).splitlines()
    assert seconds[2].endswith("| 1.0 | 9.0 |")


def test_markdown_report_states_sample_count_floor_and_device():
    text = report.markdown_report(HAND, HAND_ROWS, [10, 100], {"fid": 0.875}, 2000, "cuda:0 (H100)")
    assert "2000 generated images" in text and "FID 0.88" in text and "cuda:0 (H100)" in text


def test_plot_is_a_png(tmp_path):
    report.save_figure(report.fid_figure(HAND, HAND_ROWS, [10, 100], 0.5, 2000), tmp_path / "fid.png")
    with Image.open(tmp_path / "fid.png") as image:
        assert image.format == "PNG" and image.size[0] > 400
    assert [p.name for p in tmp_path.iterdir()] == ["fid.png"]  # no temporary left behind


# ------------------------------------------------------------------ the stage on tiny inputs
def test_cells_json_has_every_cell_with_finite_metrics(swept):
    table = json.loads((swept / "results/sweep/cells.json").read_text())
    assert table["n_samples"] == 16
    assert math.isfinite(table["floor"]["fid"])
    for c in COLUMNS:
        assert sorted(table[c], key=int) == [str(s) for s in STEPS]
        for cell in table[c].values():
            assert set(cell) == {*SCORES, "seconds"}
            assert all(math.isfinite(v) for v in cell.values())
            assert cell["fid"] >= 0 and cell["seconds"] > 0 and 0 <= cell["precision"] <= 1


def test_samplers_agree_at_one_step_and_differ_beyond(swept):
    # One step from x_T to x_0 is x0_hat(x_T) for both samplers (no noise on the last step); the
    # same seed gives the same x_T. With more steps the ancestral noise makes them differ.
    table = json.loads((swept / "results/sweep/cells.json").read_text())
    for model in ("ddpm", "ddgm"):
        ancestral, ddim = table[f"{model}_ancestral"], table[f"{model}_ddim"]
        assert ancestral["1"]["fid"] == pytest.approx(ddim["1"]["fid"], rel=1e-6)
        assert ancestral["10"]["fid"] != pytest.approx(ddim["10"]["fid"], rel=1e-6)


def test_fid_csv_is_the_plot_data(swept):
    rows = list(csv.DictReader((swept / "results/sweep/fid.csv").open()))
    assert list(rows[0]) == ["steps", *COLUMNS]
    assert [int(r["steps"]) for r in rows] == STEPS
    table = json.loads((swept / "results/sweep/cells.json").read_text())
    for row in rows:
        for c in COLUMNS:
            assert float(row[c]) == pytest.approx(table[c][row["steps"]]["fid"])


def test_table_md_and_png(swept):
    text = (swept / "results/sweep/table.md").read_text()
    noise = {"ddpm": "gaussian", "ddgm": "gamma"}
    for model, sampler in [c.split("_") for c in COLUMNS]:  # x0 clipped: sweep.clip_x0's default
        assert f"| {report.label(model, noise[model], sampler, 0.0, clip_x0=True)} |" in text
    assert "16 generated images" in text and "Floor" in text and "Device: cpu" in text
    with Image.open(swept / "results/sweep/fid_vs_steps.png") as image:
        image.load()
        assert image.format == "PNG"
    assert sorted(p.name for p in (swept / "results/sweep").iterdir()) == sorted(OUTPUTS)


def test_table_json_is_the_fids_for_dvc_and_cells_json_the_rest(swept):
    """dvc exp show stays readable: the metrics file DVC shows holds the FIDs only."""
    table = json.loads((swept / "results/sweep/table.json").read_text())
    cells = json.loads((swept / "results/sweep/cells.json").read_text())
    assert set(table) == {"n_samples", "floor_fid", *COLUMNS}
    assert table["floor_fid"] == cells["floor"]["fid"]
    for c in COLUMNS:
        assert table[c] == {s: cell["fid"] for s, cell in cells[c].items()}


def test_mlflow_run_holds_fid_curves_and_the_cells_as_a_table(swept):
    client, runs = mlflow_runs(swept)
    [run] = [r for r in runs if r.data.tags["stage"] == "sweep"]
    assert run.info.status == "FINISHED"
    assert {key for key in run.data.metrics if not key.startswith("system/")} == {
        "sweep_floor_fid", *(f"fid_{c}" for c in COLUMNS)}
    cells = json.loads((swept / "results/sweep/cells.json").read_text())
    for c in COLUMNS:  # FID against steps: one point per step count
        history = client.get_metric_history(run.info.run_id, f"fid_{c}")
        assert sorted(m.step for m in history) == STEPS
        assert all(m.value == pytest.approx(cells[c][str(m.step)]["fid"]) for m in history)
    assert run.data.params["sweep.n_samples"] == "16"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {*OUTPUTS, "cells_table.json"}
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "cells_table.json",
                                                       str(swept / "downloaded"))).read_text())
    assert set(logged["columns"]) >= {"row", "steps", "fid", "kid_mean", "seconds"}
    assert len(logged["data"]) == len(COLUMNS) * len(STEPS)


def test_step_counts_beyond_a_models_n_T_run_all_its_steps(tmp_path, monkeypatch, capsys):
    """A smaller n_T needs no edit of sweep.steps: the counts above it run all n_T steps, said
    once, and the table shows them under the count that ran."""
    root = build_inputs(tmp_path, ddgm_n_T=5, sweep_params={"steps": [1, 10],
                                                           "samplers": ["ddim"]})
    run_stage(root, monkeypatch)
    assert "step counts above ddgm's n_T = 5 are run as 5 steps" in capsys.readouterr().err
    table = json.loads((root / "results/sweep/table.json").read_text())
    assert set(table["ddpm_ddim"]) == {"1", "10"} and set(table["ddgm_ddim"]) == {"1", "5"}
    assert "ddpm_ancestral" not in table
    rows = list(csv.DictReader((root / "results/sweep/fid.csv").open()))
    assert list(rows[0]) == ["steps", "ddpm_ddim", "ddgm_ddim"]
    assert [r["steps"] for r in rows] == ["1", "5", "10"]
    assert rows[1]["ddpm_ddim"] == "" and rows[2]["ddgm_ddim"] == ""  # cells no model ran
    assert "| — |" in (root / "results/sweep/table.md").read_text()


def test_more_samples_than_test_images_fails_and_writes_nothing(tmp_path, monkeypatch, capsys):
    root = build_inputs(tmp_path, sweep_params={"n_samples": N_TEST + 1})
    with pytest.raises(SystemExit) as exit_info:
        run_stage(root, monkeypatch)
    assert exit_info.value.code == 2
    assert "sweep.n_samples = 33" in capsys.readouterr().err
    assert not (root / "results").exists()
    _, runs = mlflow_runs(root)
    assert [r.info.status for r in runs] == ["FAILED"]


def test_the_sweep_runs_unchanged_on_unets_with_the_cosine_schedule_and_other_targets(
        tmp_path, monkeypatch):
    unet = {"kind": "unet", "channels": [8, 16], "blocks": 1, "attention": True,
            "activation": "silu"}
    root = build_inputs(tmp_path, net_config=unet,
                        options={"ddpm": {"schedule": "cosine", "target": "v"},
                                 "ddgm": {"schedule": "cosine", "target": "x0"}})
    run_stage(root, monkeypatch)
    table = json.loads((root / "results/sweep/table.json").read_text())
    assert set(table) == {"n_samples", "floor_fid", *COLUMNS}
    for column in COLUMNS:
        assert sorted(map(int, table[column])) == STEPS
        assert all(math.isfinite(fid) and fid >= 0 for fid in table[column].values())


def test_conditional_models_are_swept_against_the_guidance_weight(tmp_path, monkeypatch):
    """sweep.guidance [0, 2] on conditional models: a row per (sampler, model, w), each cell
    with the conditional accuracy, which table.md, MLflow and the cells table carry too."""
    conditional = {"hidden": [8, 8], "activation": "gelu", "classes": 10}
    root = build_inputs(tmp_path, net_config=conditional,
                        sweep_params={"steps": [1, 3], "samplers": ["ddim"], "guidance": [0.0, 2.0]})
    run_stage(root, monkeypatch)
    columns = ["ddpm_ddim", "ddpm_w2_ddim", "ddgm_ddim", "ddgm_w2_ddim"]
    cells = json.loads((root / "results/sweep/cells.json").read_text())
    assert set(cells) == {"n_samples", "floor", *columns}
    for c in columns:
        for cell in cells[c].values():
            assert set(cell) == {*SCORES, "conditional_accuracy", "seconds"}
            assert 0 <= cell["conditional_accuracy"] <= 1
    # w changes the images: the guided and the plain conditional cells differ beyond one step
    assert cells["ddpm_w2_ddim"]["3"]["fid"] != pytest.approx(cells["ddpm_ddim"]["3"]["fid"], rel=1e-6)
    text = (root / "results/sweep/table.md").read_text()
    assert "## Conditional accuracy" in text
    assert f"| {report.label('ddgm', 'gamma', 'ddim', 0.0, True, 2.0)} |" in text
    assert report.label('ddgm', 'gamma', 'ddim', 0.0, True, 2.0).endswith(", guidance w=2")
    assert list(next(csv.DictReader((root / "results/sweep/fid.csv").open()))) == ["steps", *columns]
    client, runs = mlflow_runs(root)
    [run] = [r for r in runs if r.data.tags["stage"] == "sweep"]
    history = client.get_metric_history(run.info.run_id, "conditional_accuracy_ddgm_w2_ddim")
    assert sorted(m.step for m in history) == [1, 3]
    assert history[0].value == pytest.approx(cells["ddgm_w2_ddim"][str(history[0].step)]["conditional_accuracy"])


def test_guidance_for_unconditional_models_fails_in_one_line(tmp_path, monkeypatch, capsys):
    root = build_inputs(tmp_path, sweep_params={"guidance": [0.0, 1.0]})
    with pytest.raises(SystemExit) as exit_info:
        run_stage(root, monkeypatch)
    assert exit_info.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line == ("error: sweep.guidance = [0.0, 1.0] is not allowed for ddpm: it is "
                    "unconditional (trained with net.classes = 0); use [0.0], or train with "
                    "net.classes = 10")
    assert not (root / "results").exists()


# ------------------------------------------------------------------ a killed sweep resumes
def count_batches(monkeypatch: pytest.MonkeyPatch, calls: list[int], stop_after: int | None = None):
    """Count the cells' sampling calls (one per batch of 8, two per cell; the warm-up's draw has
    no generator), raising KeyboardInterrupt, as Ctrl-C would, at the call after
    ``stop_after`` batches."""
    real = DiffusionModel.sample

    def sample(self, n, *args, **kwargs):
        if kwargs.get("generator") is not None:
            if stop_after is not None and len(calls) == stop_after:
                raise KeyboardInterrupt
            calls.append(kwargs["steps"])
        return real(self, n, *args, **kwargs)

    monkeypatch.setattr(DiffusionModel, "sample", sample)


def test_a_killed_sweep_resumes_from_its_done_cells_and_batches_to_the_unbroken_table(
        swept, tmp_path, monkeypatch, capsys):
    root = build_inputs(tmp_path)
    first: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        count_batches(patch, first, stop_after=11)  # 5 cells and the first batch of the 6th
        with pytest.raises(KeyboardInterrupt):
            run_stage(root, patch)
    [state_file] = (root / ".resume").glob("sweep-*.json")
    state = json.loads(state_file.read_text())
    assert sum(map(len, state["cells"].values())) == 5 and not (root / "results").exists()
    part = sweep.load_partial(sweep.partial_file(state_file), torch.device("cpu"), 16, 8)
    assert (part.column, part.steps, len(part.images)) == ("ddgm_ancestral", STEPS[2], 8)
    _, runs = mlflow_runs(root)
    assert [r.info.status for r in runs] == ["KILLED"] and runs[0].info.run_id == state["run_id"]

    second: list[int] = []
    count_batches(monkeypatch, second)
    run_stage(root, monkeypatch)
    assert (f"resuming with 5 cells done and 8 of 16 images of ddgm_ancestral at {STEPS[2]} "
            "steps") in capsys.readouterr().out
    assert len(second) == 2 * (len(COLUMNS) * len(STEPS) - 5) - 1  # only the batches not drawn
    table = json.loads((root / "results/sweep/table.json").read_text())
    unbroken = json.loads((swept / "results/sweep/table.json").read_text())
    assert table == unbroken  # the same images, so the same scores
    assert not list((root / ".resume").iterdir())
    client, runs = mlflow_runs(root)  # the killed run reopened, every FID curve whole
    [run] = runs
    assert run.info.status == "FINISHED" and run.info.run_id == state["run_id"]
    for c in COLUMNS:
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, f"fid_{c}")) == STEPS


def test_a_part_drawn_cell_that_does_not_fit_the_sweep_is_ignored_and_said(tmp_path, capsys):
    path = tmp_path / "sweep-0123.part.pt"
    cell = evaluation.PartialCell("ddpm_ddim", 3, torch.zeros(8, 28, 28, dtype=torch.uint8),
                                  torch.Generator().get_state(), 1.5)
    cpu = torch.device("cpu")
    sweep.save_partial(cell, cpu, path)
    loaded = sweep.load_partial(path, cpu, 16, 8)
    assert (loaded.column, loaded.steps, loaded.seconds) == ("ddpm_ddim", 3, 1.5)
    assert torch.equal(loaded.images, cell.images)
    assert torch.equal(loaded.generator_state, cell.generator_state)
    assert capsys.readouterr().err == ""
    for device, n, batch_size, problem in [
            (torch.device("cuda"), 16, 8, "drawn on cpu, this sweep runs on cuda"),
            (cpu, 8, 8, "8 images, not whole batches of 8 below 8"),
            (cpu, 16, 5, "8 images, not whole batches of 5 below 16")]:
        assert sweep.load_partial(path, device, n, batch_size) is None
        assert f"ignores its part-drawn cell {path}: {problem}" in capsys.readouterr().err
    path.write_bytes(path.read_bytes()[:100])
    assert sweep.load_partial(path, cpu, 16, 8) is None
    assert "truncated or damaged" in capsys.readouterr().err
    assert sweep.load_partial(tmp_path / "none.part.pt", cpu, 16, 8) is None


def test_the_resume_state_is_keyed_by_params_and_models_and_a_bad_one_is_ignored(
        tmp_path, monkeypatch, capsys):
    root = build_inputs(tmp_path)
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    inputs = [Path("models/classifier/classifier.pt"), Path("models/ddpm/model.pt")]

    def resume_file_for(changes: dict) -> Path:
        text = (root / "params.yaml").read_text()
        (root / "params.yaml").write_text(yaml.safe_dump(merge(yaml.safe_load(text), changes)))
        try:
            return sweep.resume_file(load_params("sweep", root).as_dict(), inputs)
        finally:
            (root / "params.yaml").write_text(text)

    first = resume_file_for({})
    assert first.parent == root.resolve() / ".resume" and first.name.startswith("sweep-")
    assert resume_file_for({"train": {"epochs": 99}}) == first  # not a param of the sweep
    assert resume_file_for({"sweep": {"n_samples": 8}}) != first
    model = root / "models/ddpm/model.pt"
    model.write_bytes(model.read_bytes() + b"\0")
    assert resume_file_for({}) != first

    first.parent.mkdir()
    first.write_text("{not json")
    assert sweep.load_resume(first) == {}
    assert f"sweep: ignores its resume state {first}" in capsys.readouterr().err
    first.write_text("[1, 2]")
    assert sweep.load_resume(first) == {}
    assert "not a sweep resume state" in capsys.readouterr().err
