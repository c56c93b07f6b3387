"""FID against training epochs, drawn from ``benchmarks.quality`` JSON files.

    python -m benchmarks.curve ddpm.json ddgm.json --out fid_vs_epochs.png --table table.md

One line per (run, sampler) of the EMA weights: FID against the epoch (or, with ``--x
train_seconds``, the training time so far), with each run's floor (as many real training
digits) dashed. The table lists every scored row with KID, precision,
recall, class balance, held-out loss and the training time so far.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

from diffusion.io import save_text
from diffusion.report import save_figure


def run_label(run: dict) -> str:
    """``ddpm, cnn`` plus any other ``-S`` overrides the run was trained with."""
    overrides = dict(run.get("overrides", {}))
    net = overrides.pop("net.kind", "cnn")
    extra = "".join(f", {key}={value}" for key, value in overrides.items()
                    if key != "train.holdout_subset")
    return f"{run['model']}, {net}{extra}"


def sampler_label(row: dict) -> str:
    return (f"{row['sampler']} {row['steps']}" + (", x0 clipped" if row["clip_x0"] else "")
            + (", from eps_T" if row.get("prior") == "unit" else "")
            + (f", eta {row['eta']:g}" if row.get("eta") else ""))


def ema_rows(run: dict) -> list[dict]:
    return [row for row in run["rows"] if row.get("weights", "ema").startswith("ema")]


def curve_figure(runs: list[dict], x: str = "epoch") -> Figure:
    """``x``: ``epoch`` or ``train_seconds`` (runs of different networks compare at equal time)."""
    figure = Figure(figsize=(7.5, 4.5))
    ax = figure.subplots()
    for run in runs:
        lines: dict[str, list[dict]] = {}
        for row in sorted(ema_rows(run), key=lambda r: r[x]):
            lines.setdefault(sampler_label(row), []).append(row)
        for name, rows in sorted(lines.items()):
            ax.plot([r[x] for r in rows], [r["fid"] for r in rows], marker="o",
                    label=f"{run_label(run)}: {name}")
        ax.axhline(run["floor"]["fid"], linestyle="--", linewidth=0.8, color="grey")
    ax.set_yscale("log")
    ax.set_xlabel({"epoch": "epoch", "train_seconds": "training time (s)"}[x])
    ax.set_ylabel(f"FID, {runs[0]['n_samples']} samples (log scale)")
    ax.set_title("FID against training (dashed: real training digits)")
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def markdown(runs: list[dict]) -> str:
    lines = ["| run | epoch | sampler | FID | KID | precision | recall | class TV | held-out loss "
             "| training s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        for row in sorted(ema_rows(run), key=lambda r: (r["epoch"], sampler_label(r))):
            lines.append(f"| {run_label(run)} | {row['epoch']} | {sampler_label(row)} "
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
    args = parser.parse_args()
    runs = []
    for path in args.runs:
        run = json.loads(path.read_text())
        if "model" not in run or not ema_rows(run):
            parser.error(f"{path} is not a benchmarks.quality training run with scored rows")
        runs.append(run)
    save_figure(curve_figure(runs, args.x), args.out)
    table = markdown(runs)
    print(table, end="")
    if args.table:
        save_text(table, args.table)


if __name__ == "__main__":
    main()
