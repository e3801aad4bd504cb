"""Runs the CLI in this process once per bad value (argv: out.json) and records each exit code and stderr: every
bad value must stop at instantiation, before Lightning launches a process."""

import contextlib
import io
import json
import os
import sys
from pathlib import Path

from lightning_opt.cli import main

ROOT = Path(__file__).resolve().parents[2]
BASE = ["fit", "--config", str(ROOT / "examples" / "configs" / "quickstart.yaml"), "--trainer.max_steps=1",
        "--trainer.callbacks=[]", "--trainer.logger=false"]
S = "--trainer.strategy.init_args."
CASES = {
    "period_negative": [f"{S}period=-1"], "period_zero": [f"{S}period=0"], "nonfinite": [f"{S}nonfinite=ignore"],
    "timeout": [f"{S}timeout=-5"], "outer_momentum": [f"{S}outer_momentum=1"],
    "batch_size": ["--data.init_args.batch_size=0"], "lr_nan": ["--optimizer.lr=.nan"],
    "lr_negative": ["--optimizer.lr=-0.1"], "max_norm_inf": ["--optimizer.max_norm=.inf"],
    "strategy_typo": ["--trainer.strategy=local_sdg"], "devices": ["--trainer.devices=two"],
    "text_path": ["--data=lightning_opt.examples.CharDataModule", "--data.text_path=/no/such/file.txt"],
    "cifar_dir": ["--data.dataset=cifar10", "--data.data_dir=/no/such/dir"],
}
results = {}
for name, extra in CASES.items():
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main([*BASE, *extra])
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # a traceback would have reached the user
            code, err = f"uncaught {type(exc).__name__}", io.StringIO(str(exc))
    results[name] = {"code": code, "stderr": err.getvalue()}
# the escape hatch for debugging one's own classes: the full traceback instead of the one line
os.environ["LIGHTNING_OPT_TRACEBACK"] = "1"
try:
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        main([*BASE, *CASES["batch_size"]])
    results["traceback"] = {"code": 0, "stderr": ""}
except SystemExit as exc:
    results["traceback"] = {"code": exc.code, "stderr": ""}
except ValueError as exc:
    results["traceback"] = {"code": "raised", "stderr": str(exc)}
Path(sys.argv[1]).write_text(json.dumps(results))
