"""DVC stage ``download``: make sure data/MNIST/raw holds the four verified MNIST IDX files.

Run from the repository root as ``python -m stages.download``. Reads the param
``data.local_dir`` ("" = no local folder; a relative path is relative to the
repository root) and calls :func:`pipeline.mnist_sources.fetch_mnist`. If no source
can provide the files it prints ``error: <one line>`` to stderr and exits 1.
"""
from __future__ import annotations

from pathlib import Path

from diffusion.mnist import MNIST_FILES
from pipeline.common import fail, stage_main
from pipeline.mnist_sources import MnistUnavailableError, fetch_mnist
from pipeline.params import load_params_or_exit
from pipeline.paths import RAW_DIR


@stage_main
def main() -> None:
    params = load_params_or_exit("download")
    local = params.data.local_dir.strip()
    try:
        fetch_mnist(RAW_DIR, local_dir=Path(local).expanduser() if local else None)
    except MnistUnavailableError as error:
        fail(str(error))
    print(f"download: {RAW_DIR}: all {len(MNIST_FILES)} MNIST IDX files present, MD5 verified")


if __name__ == "__main__":
    main()
