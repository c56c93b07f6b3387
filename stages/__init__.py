"""The DVC stages: one module per stage of dvc.yaml (``python -m stages.<name>``); what they
share is in the ``pipeline`` package."""
