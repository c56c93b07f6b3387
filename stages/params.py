"""The one place that reads params.yaml.

Every stage starts with ``params = load_params_or_exit("train@ddpm")`` (its name as
``dvc stage list`` prints it). That validates the WHOLE params.yaml against ``SCHEMA``,
so a typo anywhere is caught by the first stage that runs, and returns only the keys
dvc.yaml declares under ``params:`` for that stage; reading any other key raises
KeyError. So "every key a stage reads is declared for it in dvc.yaml" holds by construction.

Errors are one-line ``ParamsError``s, e.g.
``params.yaml: ddgm.theta_0 = -1.0 is not allowed: must be a number > 0``.
``python -m stages.params`` checks both files: prints ``params.yaml: ok`` or exits 2.
"""
from __future__ import annotations

import difflib
import math
import sys
from pathlib import Path

import yaml

MODELS = ("ddpm", "ddgm")               # the diffusion models; each has its own section
SAMPLERS = ("ancestral", "ddim")
ACTIVATIONS = ("gelu", "relu", "silu")
PRECISIONS = ("auto", "bf16", "fp32")
MNIST_TRAIN, MNIST_TEST = 60000, 10000  # images in the MNIST training and test sets
MIN_METRIC_SAMPLES = 4                  # precision/recall with k = 3 needs > k; FID needs >= 2


class ParamsError(ValueError):
    """A bad params.yaml or dvc.yaml; the message is a single line."""


# ---------------------------------------------------------------- rules
# A rule has check(value, get) -> the normalised value, or BAD; and describe(get) -> the
# allowed values as a noun phrase ("a number > 0"). get("ddpm.n_T") returns an already
# validated value: SCHEMA is checked in order, so a rule may refer to earlier keys only.
BAD = object()


def _bound(b, get):
    """A bound is None, a number, or a function of ``get`` returning (number, explanation)."""
    return (None, "") if b is None else b(get) if callable(b) else (b, "")


def sample_n_samples(get):
    """Upper bound of evaluate.n_samples: evaluate scores the first N sample-stage images."""
    n = get("sample.n_samples")
    return n, f"{n} = sample.n_samples: evaluate scores the first evaluate.n_samples sampled images"


class Number:
    """An int (``kind=int``; a bool is not an int here) or a finite float (``kind=float``)
    between two bounds. PyYAML reads ``2e-4`` (no dot) as the STRING '2e-4' (YAML 1.1), so
    for float keys a string that is a valid float literal is accepted and converted."""

    def __init__(self, kind, lo=None, hi=None, lo_open=False, hi_open=False, note=""):
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open, self.note = kind, lo, hi, lo_open, hi_open, note

    def check(self, v, get):
        if self.kind is float and isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                return BAD
        types = (int,) if self.kind is int else (int, float)
        if isinstance(v, bool) or not isinstance(v, types) or not math.isfinite(v):
            return BAD
        (lo, _), (hi, _) = _bound(self.lo, get), _bound(self.hi, get)
        ok = ((lo is None or v > lo or (v == lo and not self.lo_open))
              and (hi is None or v < hi or (v == hi and not self.hi_open)))
        return self.kind(v) if ok else BAD

    def describe(self, get):
        (lo, lo_note), (hi, hi_note) = _bound(self.lo, get), _bound(self.hi, get)
        text = "an integer" if self.kind is int else "a number"
        if lo is not None and hi is not None:
            text += f" in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        elif lo is not None:
            text += f" {'>' if self.lo_open else '>='} {lo}"
        notes = "; ".join(n for n in (self.note, lo_note, hi_note) if n)
        return f"{text} ({notes})" if notes else text


class Choice:
    def __init__(self, options):
        self.options = options

    def check(self, v, get):
        return v if isinstance(v, str) and v in self.options else BAD

    def describe(self, get):
        return "one of " + ", ".join(self.options)


class OfType:
    def __init__(self, type_, text):
        self.type, self.text = type_, text

    def check(self, v, get):
        return v if type(v) is self.type else BAD

    def describe(self, get):
        return self.text


class List:
    """A non-empty list whose entries all pass the rule ``item``."""

    def __init__(self, item):
        self.item = item

    def check(self, v, get):
        out = [self.item.check(x, get) for x in v] if isinstance(v, list) else []
        return out if out and BAD not in out else BAD

    def describe(self, get):
        return f"a non-empty list, each entry {self.item.describe(get)}"


class Betas:
    """The linear schedule [beta_1, beta_T]."""

    def check(self, v, get):
        entry = Number(float, 0, 1, lo_open=True, hi_open=True)
        b = [entry.check(x, get) for x in v] if isinstance(v, list) and len(v) == 2 else [BAD]
        return b if BAD not in b and b[0] < b[1] else BAD

    def describe(self, get):
        return "a list [beta_1, beta_T] of two numbers with 0 < beta_1 < beta_T < 1"


# ---------------------------------------------------------------- schema
def Int(lo=None, hi=None, note=""):
    return Number(int, lo, hi, note=note)


POSITIVE = Number(float, 0, lo_open=True)  # a number > 0
# The optimiser holds lr as float32: larger values overflow before the first step.
LEARNING_RATE = Number(float, 0, 3.4e38, lo_open=True, note="the optimiser's float32")
UNIT = Number(float, 0, 1)                 # a number in [0, 1]
BOOL = OfType(bool, "true or false")
FOR_METRICS = "precision/recall with k = 3 needs more than 3 images"
# Upper bounds: what one machine's memory and a run's time can carry, well above any use.
MAX_N_T = 100_000         # schedules, sampling loops and the Gamma shapes grow with n_T
MAX_BATCH = 65_536
MAX_IMAGES = 1_000_000    # generated images are held in memory (uint8, 784 bytes each)
BATCH = Int(1, MAX_BATCH)
# Step counts may exceed a model's n_T (the stages then use all n_T steps and say so), and
# timesteps are fractions of n_T, so changing n_T needs no other edit.
STEPS = Int(1, MAX_N_T, note="more than a model's n_T means all n_T steps")
FRACTION_OF_N_T = "a fraction of n_T: t = round(fraction * n_T)"
MODEL = {"betas": Betas(), "n_T": Int(1, MAX_N_T, note="schedules grow with n_T")}
SCHEMA = {
    "seed": Int(0, 2**32 - 1),
    "precision": Choice(PRECISIONS),
    "data": {"train_subset": Int(0, MNIST_TRAIN, note="0 = all"), "local_dir": OfType(str, "a string")},
    "net": {"hidden": List(Int(1, 1024)), "activation": Choice(ACTIVATIONS)},
    "ddpm": dict(MODEL),
    "ddgm": {**MODEL, "theta_0": POSITIVE},
    "train": {"epochs": Int(1, 100_000), "batch_size": BATCH, "lr": LEARNING_RATE,
              "ema_decay": Number(float, 0, 1, hi_open=True), "grid_every": Int(1),
              "grid_size": Int(1, 1024),
              "holdout_subset": Int(0, MNIST_TEST, note="0 = all"), "compile": BOOL},
    "sample": {"n_samples": Int(1, MAX_IMAGES), "sampler": Choice(SAMPLERS), "steps": STEPS,
               "eta": UNIT, "clip_x0": BOOL, "batch_size": BATCH},
    "evaluate": {"n_samples": Int(MIN_METRIC_SAMPLES, sample_n_samples, note=FOR_METRICS),
                 "psnr_t": List(Number(float, 0, 1, lo_open=True, note=FRACTION_OF_N_T)), "batch_size": BATCH},
    "classifier": {"epochs": Int(1, 1000), "batch_size": BATCH, "lr": LEARNING_RATE},
    "sweep": {"steps": List(STEPS), "samplers": List(Choice(SAMPLERS)),
              "n_samples": Int(MIN_METRIC_SAMPLES, MAX_IMAGES, note=FOR_METRICS), "eta": UNIT,
              "clip_x0": BOOL,
              "batch_size": BATCH},
    "plot": {"n_digits": Int(1, 64), "t_show": List(Number(float, 0, 1, note=FRACTION_OF_N_T))},
}


def _dotted(schema, prefix=""):
    for key, sub in schema.items():
        yield prefix + key
        if isinstance(sub, dict):
            yield from _dotted(sub, prefix + key + ".")


KNOWN_KEYS = list(_dotted(SCHEMA))  # "seed", "data", "data.train_subset", ...


# ---------------------------------------------------------------- validation
def validate(params) -> dict:
    """Check every key of a params dict against SCHEMA; return a normalised copy."""
    out: dict = {}

    def get(dotted):
        node = out
        for part in dotted.split("."):
            node = node[part]
        return node

    def walk(schema, raw, prefix, dst):
        if not isinstance(raw, dict):
            what = f"{prefix[:-1]} = {raw!r}" if prefix else f"the file's content {raw!r}"
            raise ParamsError(f"params.yaml: {what} is not allowed: must be a mapping with keys {', '.join(schema)}")
        for key in raw:
            if key not in schema:
                close = difflib.get_close_matches(f"{prefix}{key}", KNOWN_KEYS, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ParamsError(f"params.yaml: unknown key {prefix}{key}{hint}")
        for key, rule in schema.items():
            if key not in raw:
                raise ParamsError(f"params.yaml: missing key {prefix}{key}")
            if isinstance(rule, dict):
                walk(rule, raw[key], f"{prefix}{key}.", dst.setdefault(key, {}))
            elif (value := rule.check(raw[key], get)) is BAD:
                raise ParamsError(f"params.yaml: {prefix}{key} = {raw[key]!r} is not allowed: "
                                  f"must be {rule.describe(get)}")
            else:
                dst[key] = value

    walk(SCHEMA, params, "", out)
    check_schedules(out)
    return out


def check_schedules(params: dict) -> None:
    """Each model's schedule, built as training would build it, must pass the noise process's
    own checks (noise left at t = T, x0 recoverable, Gamma draws exact): values that pass one
    key's bounds can still fail together."""
    from diffusion.process import ScheduleError, process_for_model

    for model in MODELS:
        try:
            process_for_model(model, params[model])
        except ScheduleError as error:
            values = ", ".join(f"{model}.{key} = {value!r}" for key, value in params[model].items())
            raise ParamsError(f"params.yaml: {values} is not allowed: {error}") from None


# ---------------------------------------------------------------- one stage's view
class DeclaredParams(dict):
    """The params of one stage: reading a key dvc.yaml does not declare for it raises
    KeyError. ``get`` raises too, as a default would silently hide an undeclared read."""

    def __init__(self, stage: str = "", path: str = "", *args):
        super().__init__(*args)
        self.stage, self.path = stage, path

    def __missing__(self, key):
        full = f"{self.path}.{key}" if self.path else str(key)
        raise KeyError(f"params key {full} is not declared for stage {self.stage} in dvc.yaml "
                       f"(declared here: {', '.join(map(str, self)) or 'nothing'})")

    def get(self, key, default=None):
        return self[key]


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise ParamsError(f"{path.name}: cannot read {path} ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path.name}: not valid YAML: {' '.join(str(e).split())}") from None


def stage_keys(dvc: dict) -> dict[str, list[str]]:
    """Map each stage name, as ``dvc stage list`` prints it, to the params keys it declares.
    A ``foreach`` stage gives one stage ``name@item`` per item, ``${item}``/``${key}`` filled in."""
    def declared(name, spec):
        keys = []
        for entry in spec.get("params") or []:
            if isinstance(entry, dict) and set(entry) == {"params.yaml"}:
                keys.extend(entry["params.yaml"] or [])
            elif isinstance(entry, str):
                keys.append(entry)
            else:
                raise ParamsError(f"dvc.yaml: stage {name} declares params {entry!r}; only params.yaml keys are supported")
        return keys

    out = {}
    for name, spec in ((dvc or {}).get("stages") or {}).items():
        items = spec.get("foreach")
        if items is None:
            out[name] = declared(name, spec)
            continue
        if not isinstance(items, (list, dict)):
            raise ParamsError(f"dvc.yaml: stage {name}: foreach {items!r} is not supported (use a list or a mapping)")
        for key, item in items.items() if isinstance(items, dict) else ((str(i), i) for i in items):
            out[f"{name}@{key}"] = [k.replace("${item}", str(item)).replace("${key}", str(key))
                                    for k in declared(name, spec["do"])]
    return out


def _select(params: dict, keys: list[str], stage: str) -> DeclaredParams:
    """The part of (validated) ``params`` named by ``keys`` (sections or dotted keys)."""
    def wrap(value, path):
        if not isinstance(value, dict):
            return value
        return DeclaredParams(stage, path, {k: wrap(v, f"{path}.{k}") for k, v in value.items()})

    out = DeclaredParams(stage)
    for key in keys:
        src, dst, parts = params, out, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(src, dict) or part not in src:
                raise ParamsError(f"dvc.yaml: stage {stage} declares params key {key}, which params.yaml does not have")
            src, path = src[part], ".".join(parts[: i + 1])
            if i == len(parts) - 1:
                dst[part] = wrap(src, path)
            else:  # dict.setdefault: a plain lookup of a missing key would raise
                dst = dict.setdefault(dst, part, DeclaredParams(stage, path))
    return out


def load_params(stage: str, root: Path | None = None) -> dict:
    """Validate ``<root>/params.yaml`` (root: default the current directory) and return only
    the keys that ``<root>/dvc.yaml`` declares for ``stage``, e.g. ``train@ddpm``."""
    root = Path(root) if root is not None else Path.cwd()
    params = validate(_read_yaml(root / "params.yaml"))
    stages = stage_keys(_read_yaml(root / "dvc.yaml"))
    if stage not in stages:
        raise ParamsError(f"dvc.yaml: unknown stage {stage!r} (known stages: {', '.join(stages)})")
    return _select(params, stages[stage], stage)


def load_params_or_exit(stage: str, root: Path | None = None) -> dict:
    """``load_params``; on a ParamsError print ``error: <message>`` to stderr and exit 2."""
    try:
        return load_params(stage, root)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(root: Path | None = None) -> None:
    """Validate params.yaml and resolve the params of every stage of dvc.yaml."""
    root = Path(root) if root is not None else Path.cwd()
    try:
        params = validate(_read_yaml(root / "params.yaml"))
        for stage, keys in stage_keys(_read_yaml(root / "dvc.yaml")).items():
            _select(params, keys, stage)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print("params.yaml: ok")


if __name__ == "__main__":
    main()
