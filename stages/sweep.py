"""DVC stage sweep: FID against the number of sampling steps, for both models and both samplers.

This is the table of the DDGM paper (Nachmani, San Roman and Wolf 2021, FID for 10 ... 1000 steps;
rows: Gaussian or Gamma noise, each with the DDPM (ancestral) and the DDIM sampler) on MNIST, with
the features of the stage ``classifier``'s network in place of Inception-v3.

For every sampler in ``sweep.samplers``, model (ddpm, ddgm) and step count in ``sweep.steps``, the
stage draws ``sweep.n_samples`` images from the model's EMA weights (same ``seed`` in every cell,
so every cell starts from the same noise; ``sweep.eta`` for DDIM, the ancestral sampler has no eta;
``sweep.clip_x0`` clips each step's x0 estimate)
and scores them against ``sweep.n_samples`` MNIST test images, a random subset fixed by ``seed``
(``quality_metrics``).
The floor is the score of as many real training images: what a perfect model gets at this sample
count. Outputs, in ``results/sweep/``:

- ``table.json``  DVC metrics: {"n_samples", "floor": {...}, "<model>_<sampler>": {"<steps>": {...}}}
- ``fid.csv``     DVC plot data: one row per step count, one FID column per ``<model>_<sampler>``
- ``table.md``    the FID table in Markdown, rows = model x sampler, columns = steps
- ``fid_vs_steps.png``  FID against steps (log x), one line per row, the floor dashed

A step count above a model's n_T becomes n_T for that model (said once), so a smaller n_T needs no
edit of ``sweep.steps``. ``precision`` sets the sampling arithmetic (the classifier stays float32,
so FIDs compare across machines).
"""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

import torch

from diffusion.classifier import embed, load_classifier
from diffusion.io import atomic_path, save_json, save_text
from diffusion.metrics import quality_metrics
from diffusion.model import load
from diffusion.network import resolve_precision
from diffusion.sampling import steps_within
from stages.common import MODELS, RAW_DIR, fail, load_or_exit, mnist_reference, plain, stage_main
from stages.params import load_params_or_exit
from stages.tracking import Run, TrackingUnavailableError

OUT_DIR = Path("results/sweep")
CLASSIFIER = Path("models/classifier/classifier.pt")
KEPT = ("fid", "kid_mean", "kid_std", "inception_score", "precision", "recall", "class_tv")
NOISE = {"ddpm": "Gaussian", "ddgm": "Gamma"}

Table = dict[str, dict[str, dict[str, float]]]  # column -> str(steps) -> metric -> value


def column(model: str, sampler: str) -> str:
    """The name of one row of the paper's table, e.g. ``ddgm_ddim`` (also the CSV column)."""
    return f"{model}_{sampler}"


def label(model: str, sampler: str, eta: float, clip_x0: bool = False) -> str:
    """Human-readable row name, e.g. ``Gamma (ddgm), DDIM eta=0`` (``, x0 clipped``)."""
    how = "ancestral (DDPM)" if sampler == "ancestral" else f"DDIM eta={eta:g}"
    return f"{NOISE.get(model, model)} ({model}), {how}{', x0 clipped' if clip_x0 else ''}"


def fid_rows(table: Table, columns: list[str], steps: list[int]) -> list[dict[str, float | str]]:
    """One row per step count: ``steps`` and each column's FID ("" where the cell was skipped)."""
    return [{"steps": s, **{c: table.get(c, {}).get(str(s), {}).get("fid", "") for c in columns}}
            for s in steps]


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """``rows`` as CSV with the header ``steps,<columns>``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["steps", *columns], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def markdown_table(table: Table, rows: dict[str, str], steps: list[int], key: str = "fid",
                   digits: int = 2) -> str:
    """Markdown table of ``key``: one line per entry of ``rows`` (column -> label), one column
    per step count; skipped cells show an em dash."""
    def cell(c: str, s: int) -> str:
        value = table.get(c, {}).get(str(s), {}).get(key)
        return "—" if value is None else f"{value:.{digits}f}"

    lines = ["| | " + " | ".join(f"{s} steps" for s in steps) + " |",
             "|---|" + "---:|" * len(steps)]
    lines += [f"| {name} | " + " | ".join(cell(c, s) for s in steps) + " |"
              for c, name in rows.items()]
    return "\n".join(lines) + "\n"


def markdown_report(table: Table, rows: dict[str, str], steps: list[int], floor: dict[str, float],
                    n_samples: int, device: str) -> str:
    """``table.md``: the FID table, what it was measured on, and the sampling times."""
    return (f"# FID against sampling steps\n\n{markdown_table(table, rows, steps)}\n"
            f"FID of {n_samples} generated images against {n_samples} random MNIST test "
            f"images, on the MNIST classifier's features (lower is better).\n"
            f"Floor ({n_samples} random real training images against the same test images): "
            f"FID {floor['fid']:.2f}.\nDevice: {device}.\n\n"
            f"## Sampling seconds\n\n{markdown_table(table, rows, steps, 'seconds', 1)}")


def plot_fid(table: Table, rows: dict[str, str], steps: list[int], floor_fid: float,
             n_samples: int, path: Path) -> None:
    """FID against steps on a log x axis, one line per row (colour = model, solid = ancestral,
    dash-dot = DDIM), the floor as a dashed black line; the y axis turns logarithmic when the
    FIDs span more than a factor 20. Written atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from matplotlib.ticker import NullLocator, ScalarFormatter

    figure = Figure(figsize=(7, 4.5), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    colours = {model: f"C{i}" for i, model in enumerate(MODELS)}
    values = [floor_fid]
    for c, name in rows.items():
        model, sampler = c.split("_", 1)
        xs = [s for s in steps if str(s) in table.get(c, {})]
        ys = [table[c][str(s)]["fid"] for s in xs]
        values += ys
        axes.plot(xs, ys, color=colours.get(model), label=name,
                  marker="o" if sampler == "ancestral" else "s",
                  linestyle="-" if sampler == "ancestral" else "-.")
    axes.axhline(floor_fid, color="black", linestyle="--", linewidth=1,
                 label=f"floor: real train vs test images ({floor_fid:.2f})")
    axes.set_xscale("log")
    axes.set_xticks(steps, [str(s) for s in steps])
    axes.xaxis.set_minor_locator(NullLocator())
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 20:
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(ScalarFormatter())  # 10 and 100 rather than 10^1, 10^2
    axes.set_xlabel("sampling steps")
    axes.set_ylabel("FID (classifier features, lower is better)")
    axes.set_title(f"MNIST: FID against sampling steps ({n_samples} samples)")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize="small")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


@stage_main
def main() -> None:
    params = plain(load_params_or_exit("sweep"))
    settings, seed = params["sweep"], params["seed"]
    n, batch_size, eta = settings["n_samples"], settings["batch_size"], settings["eta"]
    needed = [CLASSIFIER, *(Path("models") / m / "model.pt" for m in MODELS)]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        fail(f"missing {', '.join(missing)}: run `dvc repro` for the stages that make them")

    try:
        run = Run("sweep")
    except TrackingUnavailableError as error:
        fail(str(error))
    try:
        models = {m: load_or_exit(load, Path("models") / m / "model.pt",
                                  precision=params["precision"]) for m in MODELS}
        device = models[MODELS[0]].device
        precision = resolve_precision(params["precision"], device)
        run.log_params({"seed": seed, "sweep": settings, "precision": params["precision"],
                        "precision_resolved": precision})
        counts = {}  # model -> its step counts, each at most its n_T
        for name, model in models.items():
            counts[name] = sorted({steps_within(c, model.process.n_T) for c in settings["steps"]})
            if max(settings["steps"]) > model.process.n_T:
                print(f"sweep: step counts above {name}'s n_T = {model.process.n_T} are run as "
                      f"{model.process.n_T} steps", file=sys.stderr)
        steps = sorted(set().union(*counts.values()))
        test_images = mnist_reference(device, train=False, n=n, seed=seed)
        train_images = mnist_reference(device, train=True, n=n, seed=seed)
        if min(len(test_images), len(train_images)) < n:
            fail(f"sweep.n_samples = {n} but {RAW_DIR} holds only {len(test_images)} test and "
                 f"{len(train_images)} training images: lower sweep.n_samples", status=2)
        classifier = load_or_exit(load_classifier, CLASSIFIER, device)
        test_feats, test_probs = embed(classifier, test_images, batch_size)
        real_feats, real_probs = embed(classifier, train_images, batch_size)
        floor = quality_metrics(real_feats, real_probs, test_feats, test_probs, seed=seed)
        floor = {k: floor[k] for k in KEPT}
        run.log_metrics({f"floor_{k}": v for k, v in floor.items()})

        for model in models.values():  # warm-up (CUDA context, kernel choice): not timed below
            model.sample(min(n, batch_size), steps=1, seed=seed, batch_size=batch_size)

        # Paper order: samplers outer, models inner.
        rows = {column(m, s): label(m, s, eta, settings["clip_x0"])
                for s in settings["samplers"] for m in MODELS}
        table: Table = {c: {} for c in rows}
        for sampler in settings["samplers"]:
            for name, model in models.items():
                c = column(name, sampler)
                for count in counts[name]:
                    started = time.perf_counter()
                    fake = model.sample(n, steps=count, sampler=sampler, eta=eta, seed=seed,
                                        batch_size=batch_size, clip_x0=settings["clip_x0"])
                    seconds = time.perf_counter() - started
                    fake_feats, fake_probs = embed(classifier, fake, batch_size)
                    scores = quality_metrics(fake_feats, fake_probs, test_feats, test_probs,
                                             seed=seed)
                    cell = {**{k: scores[k] for k in KEPT}, "seconds": seconds}
                    table[c][str(count)] = cell
                    run.log_metrics({f"{k}_{c}_{count}": v for k, v in cell.items()})
                    run.log_metrics({f"fid_{c}": cell["fid"]}, step=count)  # a curve in MLflow
                    print(f"sweep: {c:16s} {count:5d} steps  FID {cell['fid']:8.2f}  "
                          f"{seconds:7.1f} s", flush=True)
    except BaseException:  # the run is marked failed, also on a clean exit by fail()
        run.finish("FAILED")
        raise

    columns = list(rows)
    save_json({"n_samples": n, "floor": floor, **table}, OUT_DIR / "table.json")
    save_text(csv_text(fid_rows(table, columns, steps), columns), OUT_DIR / "fid.csv")
    save_text(markdown_report(table, rows, steps, floor, n, device_name(device)),
              OUT_DIR / "table.md")
    plot_fid(table, rows, steps, floor["fid"], n, OUT_DIR / "fid_vs_steps.png")
    for name in ("table.json", "fid.csv", "table.md", "fid_vs_steps.png"):
        run.log_artifact(OUT_DIR / name)
    run.finish()
    print(f"sweep: {sum(map(len, table.values()))} cells on {n} samples, {precision} "
          f"(floor FID {floor['fid']:.2f}) -> {OUT_DIR}")


if __name__ == "__main__":
    main()
