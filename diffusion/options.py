"""The values params.yaml chooses between, each list written once.

The modules that implement a choice import its names from here (``network``: networks,
activations and precisions; ``process``: noises, schedules and targets; ``sampling``: samplers
and priors; ``training``: learning-rate schedules), and ``pipeline.params`` validates params.yaml
against them without importing torch or any of those modules.
"""

NETWORKS = ("cnn", "unet")
CLASSES = (0, 10)                   # net.classes: unconditional, or conditioned on the digit
ACTIVATIONS = ("gelu", "relu", "silu")
PRECISIONS = ("auto", "bf16", "fp32")
GAUSSIAN, GAMMA = "gaussian", "gamma"
NOISES = (GAUSSIAN, GAMMA)          # DDPM (Ho et al. 2020), DDGM (Nachmani et al. 2021)
SCHEDULES = ("linear", "cosine")
TARGETS = ("eps", "x0", "v")
SAMPLERS = ("ancestral", "ddim")
PRIORS = ("exact", "unit")          # where sampling starts: the forward marginal at T, or eps_T
LR_SCHEDULES = ("constant", "cosine", "linear")
