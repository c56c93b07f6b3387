"""Check params.yaml and dvc.yaml without running anything: ``python -m tools.check``.

Validates every key of params.yaml, builds each model's noise process (so a schedule that
cannot be computed exactly is refused, as the train stage would refuse it) and resolves the
params of every stage of dvc.yaml. Prints ``params.yaml: ok``, or ``error: <one line>`` and
exits 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from diffusion.process import make_process
from pipeline.params import PARAMS_FILE, ParamsError, checked, read_yaml, select, stage_keys


def main(root: Path | None = None) -> None:
    root = Path(root) if root is not None else Path.cwd()
    try:
        params = checked(read_yaml(root / PARAMS_FILE), make_process)
        for stage, keys in stage_keys(root).items():
            select(params, keys, stage)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{PARAMS_FILE}: ok")


if __name__ == "__main__":
    main()
