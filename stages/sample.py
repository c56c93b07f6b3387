"""DVC stage sample@<model>: draw ``sample.n_samples`` digits from the model's EMA weights.

Writes ``results/sample/<model>/samples.npy`` (uint8, N x 28 x 28) and ``grid.png`` (the first 64),
and logs them to an MLflow run nested under the model's training run. A conditional model
(``net.classes`` = 10) draws the digits ``sample.digits`` in turn, with classifier-free guidance
``sample.guidance``, writes the digit asked of each image to ``labels.npy``, and its grid has one
row per digit asked for (the first ten of each: a 10 x 10 grid for all ten digits).
"""

from __future__ import annotations

import time

from diffusion.data import grid_image, save_grid
from diffusion.io import save_array
from diffusion.model import load
from diffusion.network import resolve_precision
from diffusion.sampling import steps_within
from pipeline.common import fail, load_or_exit, model_argument, open_run, stage_main, warn
from pipeline.params import load_params_or_exit
from pipeline.paths import labels_file, model_file, sample_dir, samples_file

GRID_IMAGES = 64


@stage_main
def main() -> None:
    model_name = model_argument("sample")
    stage = f"sample@{model_name}"
    params = load_params_or_exit(stage)
    settings = params.sample
    model = load_or_exit(load, model_file(model_name), precision=params.precision)
    precision = resolve_precision(model.precision, model.device)
    steps = steps_within(settings.steps, model.process.n_T)
    if steps < settings.steps:
        print(f"{stage}: sample.steps = {settings.steps} is more than this model's n_T = "
              f"{model.process.n_T}; sampling with all {steps} steps")
    digits = settings.digits if model.classes else None
    if not model.classes and settings.guidance > 0:
        fail(f"sample.guidance = {settings.guidance} needs a conditional model, but "
             f"{model_file(model_name)} was trained with net.classes = 0: set net.classes = 10 "
             "(and retrain) or sample.guidance = 0", status=2)
    if digits and settings.guidance > 0 and not model.config.get("train", {}).get("label_drop"):
        warn(f"{stage}: {model_file(model_name)} was trained with train.label_drop = 0, so its "
             "unconditional prediction never learned: guidance mixes in an untrained prediction")
    run = open_run(stage, model_name, parent_model_file=model_file(model_name))
    run.log_params({"seed": params.seed, "sample": settings.as_dict(), "precision": params.precision,
                    "precision_resolved": precision})

    started = time.perf_counter()
    with run.system_metrics():
        images = model.sample(settings.n_samples, steps=steps, sampler=settings.sampler,
                              eta=settings.eta, seed=params.seed, batch_size=settings.batch_size,
                              clip_x0=settings.clip_x0, prior=settings.prior, digit=digits,
                              guidance=settings.guidance if digits else 0.0)
    seconds = time.perf_counter() - started
    save_array(images.numpy(), samples_file(model_name))
    if digits:
        save_array(model.labels(digits, len(images)).cpu().numpy(), labels_file(model_name))
    shown, per_row = images[:GRID_IMAGES], None
    if digits and len(images) >= len(digits):  # image i was asked for digits[i % len(digits)]
        per_row = min(10, len(images) // len(digits))
        shown = images[[i * len(digits) + row for row in range(len(digits)) for i in range(per_row)]]
    save_grid(shown, sample_dir(model_name) / "grid.png", per_row)
    run.log_metrics({"images_per_s": len(images) / seconds})
    run.set_tags({"sample_seconds": f"{seconds:.1f}"})
    run.log_image(grid_image(shown, per_row).numpy(), key="samples", step=0)
    run.finish()
    print(f"{stage}: {len(images)} images, {settings.sampler} sampler, {steps} steps, "
          f"{seconds:.1f} s on {model.device} ({precision}) -> {sample_dir(model_name)}")


if __name__ == "__main__":
    main()
