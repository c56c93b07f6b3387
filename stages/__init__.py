"""The DVC stages: one module per stage of dvc.yaml, plus what they share (common, params, tracking, mnist_sources)."""
