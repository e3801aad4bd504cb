"""Every YAML config in examples/configs, a few optimizer steps each on the 2 ranks ``run_ranks`` started (a sync
and a validation included), through the real ``LightningOptCLI`` (``run=False``, then ``fit``).

Usage: run_configs.py OUT CONFIG [CONFIG ...]; writes OUT/<config stem>.rank<r>.done after each fit.
"""

import os
import sys
from pathlib import Path

from lightning_opt.cli import LightningOptCLI

out, configs = Path(sys.argv[1]), sys.argv[2:]
rank = os.environ.get("RANK", "0")
for config in configs:
    name = Path(config).stem
    cli = LightningOptCLI(run=False, args=[
        "--config", config, "--trainer.max_steps=8", "--trainer.max_epochs=1", "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=2", f"--trainer.default_root_dir={out / name}",
        "--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0"])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 8, (name, cli.trainer.global_step)
    (out / f"{name}.rank{rank}.done").write_text(str(cli.trainer.strategy))
