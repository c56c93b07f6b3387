"""What the DVC stages share: params.yaml's schema and each stage's view of it (``params``),
the pipeline's file paths (``paths``), MLflow runs (``tracking``) over a hardened store
(``store``), MNIST's download sources (``mnist_sources``) and the stages' common helpers
(``common``). Free of torch training code; ``stages/`` holds one script per DVC stage."""
