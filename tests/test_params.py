"""Tests of pipeline/params.py: the schema of params.yaml and the per-stage view of it."""
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so that `pytest` works from any directory, not only `python -m pytest`

from diffusion.process import make_process  # noqa: E402
from pipeline.params import ParamsError, load_params, load_params_or_exit, validate  # noqa: E402

SHIPPED = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_value(dotted, value, params=None):
    """A copy of the shipped params with one key set (or removed, for value ...)."""
    params = copy.deepcopy(params or SHIPPED)
    *parents, last = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return params


def error_of(params):
    with pytest.raises(ParamsError) as info:
        validate(params, make_process)
    message = str(info.value)
    assert "\n" not in message and message.startswith("params.yaml: ")
    return message


def dvc_stages():
    """Stage names as `dvc stage list` prints them, expanding foreach (independently of the module)."""
    names = []
    for name, spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        items = SHIPPED["models"] if spec.get("foreach") == "${models}" else spec.get("foreach")
        names += [f"{name}@{item}" for item in items] if "foreach" in spec else [name]
    return names


def test_shipped_params_validate():
    out = validate(SHIPPED)
    assert out["train"]["lr"] == pytest.approx(2e-4) and out["ddpm"]["n_T"] == 1000


BAD = [  # (key, bad value, fragment of the allowed values)
    ("ddpm.n_T", 0, "an integer in [1, 100000]"),
    ("ddgm.n_T", -5, "an integer in [1, 100000]"),
    ("ddpm.n_T", 1_000_000_000, "an integer in [1, 100000]"),
    ("ddpm.betas", [1e-4], "0 < beta_1 < beta_T < 1"),
    ("ddpm.betas", [0.02, 1e-4], "0 < beta_1 < beta_T < 1"),
    ("ddgm.betas", [0.0, 0.02], "0 < beta_1 < beta_T < 1"),
    ("ddgm.betas", [1e-4, 1.0], "0 < beta_1 < beta_T < 1"),
    ("ddgm.betas", [1e-4, 0.02, 0.03], "0 < beta_1 < beta_T < 1"),
    ("ddgm.theta_0", -1.0, "a number > 0"),
    ("ddgm.theta_0", 0, "a number > 0"),
    ("train.epochs", 0, "an integer in [1, 100000]"),
    ("classifier.epochs", 0, "an integer in [1, 1000]"),
    ("train.batch_size", 0, "an integer in [1, 65536]"),
    ("train.batch_size", 10**9, "an integer in [1, 65536]"),
    ("sample.batch_size", 0, "an integer in [1, 65536]"),
    ("evaluate.batch_size", -1, "an integer in [1, 65536]"),
    ("classifier.batch_size", 0, "an integer in [1, 65536]"),
    ("classifier.train_subset", 60001, "an integer in [0, 60000]"),
    ("train.lr", 0.0, "a number in (0, 3.4e+38]"),
    ("train.lr", -2e-4, "a number in (0, 3.4e+38]"),
    ("train.lr", 1e300, "a number in (0, 3.4e+38]"),
    ("classifier.lr", 0, "a number in (0, 3.4e+38]"),
    ("train.ema_decay", 1.0, "a number in [0, 1)"),
    ("train.ema_decay", -0.1, "a number in [0, 1)"),
    ("sample.sampler", "euler", "one of ancestral, ddim"),
    ("net.activation", "tanh", "one of gelu, relu, silu"),
    ("sample.steps", 0, "an integer in [1, 100000]"),
    ("sample.steps", 100001, "an integer in [1, 100000]"),
    ("sweep.steps", [10, 100001], "each entry an integer in [1, 100000]"),
    ("sweep.steps", [0], "each entry an integer in [1, 100000]"),
    ("sweep.steps", [], "a non-empty list"),
    ("sweep.samplers", [], "a non-empty list"),
    ("sweep.samplers", ["ancestral", "euler"], "each entry one of ancestral, ddim"),
    ("sample.eta", 1.5, "a number in [0, 1]"),
    ("sample.eta", -0.1, "a number in [0, 1]"),
    ("sweep.eta", 2, "a number in [0, 1]"),
    ("evaluate.n_samples", 3, "an integer in [4, 10000]"),
    ("sweep.n_samples", 3, "an integer in [4, 1000000]"),
    ("sample.n_samples", 10**12, "an integer in [1, 1000000]"),
    ("evaluate.n_samples", 10001, "10000 = sample.n_samples"),
    ("net.hidden", [], "a non-empty list"),
    ("net.hidden", [16, 0, 16], "each entry an integer in [1, 1024]"),
    ("data.train_subset", -1, "an integer in [0, 60000]"),
    ("data.train_subset", 60001, "an integer in [0, 60000]"),
    ("train.holdout_subset", -1, "an integer in [0, 10000]"),
    ("train.holdout_subset", 10001, "an integer in [0, 10000]"),
    ("train.grid_every", 0, "an integer >= 1"),
    ("train.grid_size", 0, "an integer in [1, 1024]"),
    ("evaluate.psnr_t", [0, 0.5], "each entry a number in (0, 1] (a fraction of n_T"),
    ("evaluate.psnr_t", [50], "each entry a number in (0, 1] (a fraction of n_T"),
    ("plot.t_show", [-0.1, 0], "each entry a number in [0, 1] (a fraction of n_T"),
    ("plot.t_show", [1000], "each entry a number in [0, 1] (a fraction of n_T"),
    ("precision", "fp16", "one of auto, bf16, fp32"),
    ("plot.n_digits", 0, "an integer in [1, 64]"),
    ("seed", 4.2, "an integer"),
    ("seed", "42", "an integer"),
    ("data.local_dir", 5, "a string"),
    ("train.compile", "yes", "true or false"),
    ("train.epochs", True, "an integer in [1, 100000]"),   # a bool is not an int
    ("seed", False, "an integer"),
    ("train.lr", "fast", "a number in (0, 3.4e+38]"),   # a non-numeric string is not a number
    ("train.lr", float("nan"), "a number in (0, 3.4e+38]"),
    ("train.lr", float("inf"), "a number in (0, 3.4e+38]"),
    ("train.epochs", 10.0, "an integer in [1, 100000]"),     # a float is not an int
    ("net", [16, 32], "must be a mapping with keys kind, hidden, channels, blocks, attention, activation, classes"),
    ("net.kind", "resnet", "one of cnn, unet"),
    ("net.channels", [48, 100], "[c28, c14] or [c28, c14, c7] of multiples of 8"),
    ("net.channels", [48], "[c28, c14] or [c28, c14, c7] of multiples of 8"),
    ("net.channels", [8, 16, 32, 64], "[c28, c14] or [c28, c14, c7] of multiples of 8"),
    ("train.lr_schedule", "step", "one of constant, cosine, linear"),
    ("train.lr_floor", 1.5, "a number in [0, 1]"),
    ("train.min_snr_gamma", -1, "a number in [0, 10000.0]"),
    ("train.ema_warmup", 1, "a number in (1, 10000.0]"),
    ("ddpm.schedule", "sigmoid", "one of linear, cosine"),
    ("ddgm.target", "score", "one of eps, x0, v"),
    ("net.classes", 5, "0 (unconditional) or 10 (conditioned on the digit)"),
    ("net.classes", True, "0 (unconditional) or 10 (conditioned on the digit)"),
    ("train.label_drop", 1.0, "a number in [0, 1)"),
    ("sample.digits", [10], "a non-empty list of distinct digits 0..9"),
    ("sample.digits", [3, 3], "a non-empty list of distinct digits 0..9"),
    ("sample.digits", [], "a non-empty list of distinct digits 0..9"),
    ("sample.guidance", -1, "a number in [0, 100]"),
]


@pytest.mark.parametrize("key, value, allowed", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_value_is_one_line_naming_key_value_and_allowed(key, value, allowed):
    message = error_of(with_value(key, value))
    assert f"{key} = {value!r} is not allowed: " in message
    assert allowed in message


@pytest.mark.parametrize("key, value, why", [
    ("ddgm.theta_0", 1e155, "theta_0 = 1e+155 is outside [1.57e-06, 0.316] for this schedule"),
    ("ddgm.theta_0", 1e-200, "theta_0 = 1e-200 is outside [1.57e-06, 0.316] for this schedule"),
    ("ddgm.theta_0", 1e-15, "theta_0 = 1e-15 is outside [1.57e-06, 0.316] for this schedule"),
    ("ddpm.betas", [1e-8, 2e-8], "1 - alpha_bar_T = 1.5e-05 is below 0.001"),
    ("ddgm.betas", [0.5, 0.9], "alpha_bar_T = 0 is below 1e-30"),
], ids=lambda v: v if isinstance(v, str) and "." in v else None)
def test_values_within_each_bound_that_break_the_schedule_are_refused(key, value, why):
    """Each key is in range, but the schedule they make leaves no noise, underflows, or asks
    the Gamma draw for shapes it cannot draw exactly: refused in one line, before any work."""
    message = error_of(with_value(key, value))
    model = key.split(".")[0]
    assert f"{key} = {value!r}" in message and f"{model}.n_T = 1000" in message
    assert why in message


def test_message_format_is_exact():
    assert error_of(with_value("ddgm.theta_0", -1.0)) == \
        "params.yaml: ddgm.theta_0 = -1.0 is not allowed: must be a number > 0"
    assert error_of(with_value("train.lr", "fast")) == \
        "params.yaml: train.lr = 'fast' is not allowed: must be a number in (0, 3.4e+38] " \
        "(the optimiser's float32)"


def test_a_smaller_n_t_needs_no_other_edit():
    # Step counts above n_T mean all n_T steps, and timesteps are fractions of n_T.
    params = with_value("ddgm.n_T", 50, with_value("ddpm.n_T", 20))
    validated = validate(params)
    assert validated["sample"]["steps"] == 1000 and validated["ddgm"]["n_T"] == 50


def test_sample_n_samples_below_evaluate_names_both_keys():
    message = error_of(with_value("sample.n_samples", 5000))
    assert "evaluate.n_samples = 10000" in message and "sample.n_samples" in message


@pytest.mark.parametrize("key, typo, suggestion", [
    ("train.epochs", "epoch", "train.epochs"),
    ("ddgm.theta_0", "theta0", "ddgm.theta_0"),
    ("sample.sampler", "samplr", "sample.sampler"),
    ("train", "trian", "train"),
])
def test_misspelt_key_suggests_the_known_one(key, typo, suggestion):
    params = copy.deepcopy(SHIPPED)
    *parents, last = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[typo] = node.pop(last)
    wrong = ".".join([*parents, typo])
    assert error_of(params) == f"params.yaml: unknown key {wrong} (did you mean {suggestion}?)"


def test_unknown_key_without_a_close_match():
    assert error_of(with_value("train.xyzzy_frobnicate", 1)) == "params.yaml: unknown key train.xyzzy_frobnicate"


@pytest.mark.parametrize("key", ["train.lr", "seed", "ddgm.theta_0", "plot"])
def test_missing_key(key):
    assert error_of(with_value(key, ...)) == f"params.yaml: missing key {key}"


def test_empty_file_is_rejected():
    assert "must be a mapping" in error_of(None)


def test_numeric_strings_and_ints_are_accepted_for_float_keys():
    raw = yaml.safe_load("lr: 2e-4\nbeta: 1e-4")
    assert raw["lr"] == "2e-4"  # PyYAML (YAML 1.1) reads a float without a dot as a string
    params = with_value("ddpm.betas", [raw["beta"], "0.02"], with_value("train.lr", raw["lr"]))
    out = validate(with_value("classifier.lr", 1, params))
    assert out["train"]["lr"] == 2e-4 and out["ddpm"]["betas"] == [1e-4, 0.02]
    assert out["classifier"]["lr"] == 1.0 and isinstance(out["classifier"]["lr"], float)


def test_train_ddpm_gets_exactly_its_declared_keys():
    params = load_params("train@ddpm", ROOT)
    assert set(params) == {"seed", "precision", "data", "net", "ddpm", "train"}
    assert set(params["data"]) == {"train_subset", "scale"}
    assert params["ddpm"].n_T == 1000 and params.train.epochs == SHIPPED["train"]["epochs"]
    assert isinstance(params.train.lr, float) and params.data.as_dict() == {
        "train_subset": SHIPPED["data"]["train_subset"], "scale": SHIPPED["data"]["scale"]}
    for read in (lambda: params["ddgm"], lambda: params.data.local_dir, lambda: params.sample):
        with pytest.raises(AttributeError, match="not declared for stage train@ddpm in dvc.yaml"):
            read()


def test_foreach_item_is_substituted():
    assert "ddgm" in load_params("train@ddgm", ROOT) and "ddpm" not in load_params("train@ddgm", ROOT)


@pytest.mark.parametrize("stage", dvc_stages())
def test_every_dvc_stage_loads(stage):
    params = load_params(stage, ROOT)
    name, _, item = stage.partition("@")
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]
    declared = (spec["do"] if item else spec).get("params", [])
    assert set(params) == {k.replace("${item}", item).split(".")[0] for k in declared}


def test_unknown_stage_lists_the_known_ones():
    with pytest.raises(ParamsError, match=r"unknown stage 'trian@ddpm' \(known stages: download, .*train@ddpm"):
        load_params("trian@ddpm", ROOT)


@pytest.fixture
def project(tmp_path):
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_undeclared_key_in_dvc_yaml_is_reported(project):
    dvc = yaml.safe_load((project / "dvc.yaml").read_text())
    dvc["stages"]["plot"]["params"].append("plot.n_digitz")
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc))
    with pytest.raises(ParamsError, match="stage plot declares params key plot.n_digitz"):
        load_params("plot", project)


def test_load_params_or_exit(project, capsys):
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("epochs: 100", "epochs: 0"))
    with pytest.raises(SystemExit) as info:
        load_params_or_exit("train@ddpm", project)
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: params.yaml: train.epochs = 0 is not allowed: must be an integer in [1, 100000]\n"


def run_cli(cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "tools.check"], cwd=cwd, env=env, capture_output=True, text=True)


def test_cli_ok(project):
    result = run_cli(project)
    assert result.returncode == 0 and result.stdout == "params.yaml: ok\n"


def test_cli_bad_file_exits_2_with_one_line(project):
    text = (ROOT / "params.yaml").read_text().replace("lr: 2.0e-4", "lr: -1")
    (project / "params.yaml").write_text(text)
    result = run_cli(project)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "train.lr = -1 is not allowed" in result.stderr


# ---------------------------------------------------------------- the models list
def test_models_are_listed_once_and_each_section_names_its_noise():
    out = validate(SHIPPED)
    assert out["models"] == ["ddpm", "ddgm"]
    assert out["ddpm"]["noise"] == "gaussian" and "theta_0" not in out["ddpm"]
    assert out["ddgm"]["noise"] == "gamma" and out["ddgm"]["theta_0"] == 0.001


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["ddpm"].update(noise="laplace"),
     "ddpm.noise = 'laplace' is not allowed: must be one of gaussian, gamma"),
    (lambda p: p["ddgm"].pop("noise"), "missing key ddgm.noise"),
    (lambda p: p["ddpm"].update(theta_0=0.001),
     "unknown key ddpm.theta_0 (theta_0 is a key of gamma noise; ddpm has noise: gaussian)"),
    (lambda p: p.update(models=["ddpm", "ddgm", "small"]), "missing key small"),
    (lambda p: p.pop("models"), "missing key models"),
    (lambda p: p.update(models=["ddpm", "ddpm"]), "models = ['ddpm', 'ddpm'] is not allowed"),
    (lambda p: p.update(models=["ddpm", "train"]), "models = ['ddpm', 'train'] is not allowed"),
    (lambda p: p.update(models=[]), "models = [] is not allowed: must be a non-empty list"),
    (lambda p: p.update(models=["DDPM"]), "models = ['DDPM'] is not allowed"),
])
def test_bad_models_list_or_noise_is_one_line(edit, message):
    params = copy.deepcopy(SHIPPED)
    edit(params)
    assert message in error_of(params)


def test_a_model_added_to_the_list_gets_its_own_stages(project):
    """Models are stated once, in params.yaml: dvc.yaml's foreach makes their stages."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["models"].append("ddgm_wide")
    params["ddgm_wide"] = {**params["ddgm"], "theta_0": 0.01}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    loaded = load_params("train@ddgm_wide", project)
    assert loaded["ddgm_wide"]["theta_0"] == 0.01 and "ddgm" not in loaded
    assert load_params("sweep", project)["models"] == ["ddpm", "ddgm", "ddgm_wide"]
