"""FID against training epochs, drawn from ``benchmarks.quality`` JSON files.

    python -m benchmarks.curve ddpm.json ddgm.json --out fid_vs_epochs.png --table table.md

One line per (run, sampler) of the EMA weights (per EMA too, where a run scored several;
``--weights ema0.999:20`` keeps one): FID against the epoch (or, with ``--x train_seconds``, the
training time so far), with each run's floor (as many real training digits) dashed. The table
lists every scored row with KID, precision, recall, class balance, held-out loss and the
training time so far.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

from diffusion.io import save_text
from diffusion.report import save_figure


def run_label(run: dict) -> str:
    """``ddpm, cnn`` plus any other ``-S`` overrides the run was trained with (or the file's
    name, with ``--names file``)."""
    if "label" in run:
        return run["label"]
    overrides = dict(run.get("overrides", {}))
    net = overrides.pop("net.kind", "cnn")
    extra = "".join(f", {key}={value}" for key, value in overrides.items()
                    if key != "train.holdout_subset")
    return f"{run['model']}, {net}{extra}"


def sampler_label(row: dict) -> str:
    return (f"{row['sampler']} {row['steps']}" + (", x0 clipped" if row["clip_x0"] else "")
            + (", from eps_T" if row.get("prior") == "unit" else "")
            + (f", eta {row['eta']:g}" if row.get("eta") else ""))


def ema_rows(run: dict, weights: str | None = None) -> list[dict]:
    """The rows of the EMA weights (of ``weights`` alone, if given)."""
    return [row for row in run["rows"] if row.get("weights", "ema").startswith("ema")
            and (weights is None or row.get("weights") == weights)]


def labelled_rows(run: dict, weights: str | None = None) -> list[tuple[str, dict]]:
    """(label, row) of each EMA row; the label names the EMA where the run has several."""
    rows = ema_rows(run, weights)
    several = len({row.get("weights") for row in rows}) > 1
    return [(sampler_label(row) + (f", {row['weights']}" if several else ""), row) for row in rows]


def curve_figure(runs: list[dict], x: str = "epoch", weights: str | None = None) -> Figure:
    """``x``: ``epoch`` or ``train_seconds`` (runs of different networks compare at equal time);
    ``weights``: one EMA's rows only."""
    lines: dict[str, list[dict]] = {}
    for run in runs:
        for label, row in sorted(labelled_rows(run, weights), key=lambda item: item[1][x]):
            lines.setdefault(f"{run_label(run)}: {label}", []).append(row)
    # the legend beside the axes, so that it hides no point; one colour per line up to 20
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    ax = figure.subplots()
    colours = matplotlib.colormaps["tab10" if len(lines) <= 10 else "tab20"].colors
    for colour, (name, rows) in zip(itertools.cycle(colours), lines.items()):
        ax.plot([r[x] for r in rows], [r["fid"] for r in rows], marker="o", color=colour,
                label=name)
    for floor in sorted({run["floor"]["fid"] for run in runs}):
        ax.axhline(floor, linestyle="--", linewidth=0.8, color="grey")
    ax.set_yscale("log")
    ax.set_xlabel({"epoch": "epoch", "train_seconds": "training time (s)"}[x])
    ax.set_ylabel(f"FID, {runs[0]['n_samples']} samples (log scale)")
    ax.set_title("FID against training (dashed: real training digits)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure


def markdown(runs: list[dict], weights: str | None = None) -> str:
    lines = ["| run | epoch | sampler | FID | KID | precision | recall | class TV | held-out loss "
             "| training s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        for label, row in sorted(labelled_rows(run, weights),
                                 key=lambda item: (item[1]["epoch"], item[0])):
            lines.append(f"| {run_label(run)} | {row['epoch']} | {label} "
                         f"| {row['fid']:.1f} | {row['kid_mean']:.1f} | {row['precision']:.2f} "
                         f"| {row['recall']:.2f} | {row['class_tv']:.3f} "
                         f"| {row['heldout_loss']:.4f} | {row['train_seconds']:.0f} |")
        floor = run["floor"]
        lines.append(f"| floor ({run['n_samples']} real training digits) | | | {floor['fid']:.1f} "
                     f"| {floor['kid_mean']:.2f} | {floor['precision']:.2f} "
                     f"| {floor['recall']:.2f} | {floor['class_tv']:.3f} | | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.curve",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="benchmarks.quality --json files")
    parser.add_argument("--out", type=Path, required=True, help="the figure (.png)")
    parser.add_argument("--table", type=Path, default=None, help="also write the markdown table")
    parser.add_argument("--x", choices=["epoch", "train_seconds"], default="epoch",
                        help="the horizontal axis")
    parser.add_argument("--names", choices=["overrides", "file"], default="overrides",
                        help="name each run by its -S overrides or by its file's name")
    parser.add_argument("--weights", default=None,
                        help="only this EMA's rows, e.g. ema0.999:20 (default: every EMA)")
    args = parser.parse_args()
    runs = []
    for path in args.runs:
        run = json.loads(path.read_text())
        if "model" not in run or not ema_rows(run):
            parser.error(f"{path} is not a benchmarks.quality training run with scored rows")
        if not ema_rows(run, args.weights):
            kept = sorted({row["weights"] for row in ema_rows(run)})
            parser.error(f"{path} has no rows of --weights {args.weights}; "
                         f"it has {', '.join(kept)}")
        if args.names == "file":
            run["label"] = f"{run['model']}, {path.stem}"
        runs.append(run)
    save_figure(curve_figure(runs, args.x, args.weights), args.out)
    table = markdown(runs, args.weights)
    print(table, end="")
    if args.table:
        save_text(table, args.table)


if __name__ == "__main__":
    main()
