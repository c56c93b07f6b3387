"""Where the pipeline's files live, each path written once for the stages and the benchmarks.

dvc.yaml names the same files as deps and outs; tests/test_dvc_deps.py checks that the two agree.
"""

from pathlib import Path

RAW_DIR = Path("data/MNIST/raw")                     # download: the four MNIST IDX files
CLASSIFIER_FILE = Path("models/classifier/classifier.pt")
CLASSIFIER_RESULTS = Path("results/classifier")      # metrics.json: test accuracy
SWEEP_DIR = Path("results/sweep")
PLOT_DIR = Path("results/plot")
RESUME_DIR = Path(".resume")                         # training states, outside DVC's outputs


def model_file(model: str) -> Path:
    """train@<model>'s model file (EMA and raw weights, config)."""
    return Path("models") / model / "model.pt"


def train_dir(model: str) -> Path:
    """train@<model>'s log.csv and grids/."""
    return Path("results/train") / model


def sample_dir(model: str) -> Path:
    """sample@<model>'s samples.npy and grid.png."""
    return Path("results/sample") / model


def samples_file(model: str) -> Path:
    return sample_dir(model) / "samples.npy"


def labels_file(model: str) -> Path:
    """A conditional model's requested digit of each sample (int64 (N,))."""
    return sample_dir(model) / "labels.npy"


def evaluate_dir(model: str) -> Path:
    """evaluate@<model>'s metrics.json (DVC metrics) and detail.json."""
    return Path("results/evaluate") / model
