"""The TensorBoard custom-scalars layout lands in a real event file and references the tags we log."""

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from scripts._common import TinyModel
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_opt.tensorboard import DashboardCallback, dashboard_layout


class Single(TinyModel):
    def _loader(self):
        from scripts._common import make_data

        return torch.utils.data.DataLoader(make_data(32), batch_size=8)


def test_layout_written_and_parsable(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=logger, callbacks=[DashboardCallback()],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(Single(bn=False))
    (event_file,) = list(tmp_path.rglob("events.out.tfevents.*"))
    layouts = []
    for event in EventFileLoader(str(event_file)).Load():
        for value in event.summary.value:
            if value.tag == "custom_scalars__config__":
                layout = layout_pb2.Layout()
                layout.ParseFromString(value.tensor.string_val[0])
                layouts.append(layout)
    assert layouts, "no custom-scalars layout in the event file"
    titles = {c.title for c in layouts[0].category}
    assert {"Optimization", "Curvature", "Noise", "Communication"} <= titles
    curvature = next(c for c in layouts[0].category if c.title == "Curvature")
    eos = next(ch for ch in curvature.chart if "edge of stability" in ch.title)
    assert list(eos.multiline.tag) == ["curvature/lambda_max", "curvature/two_over_lr"]


def test_layout_names_match_what_strategies_log():
    tags = str(dashboard_layout())
    for tag in ("comm/bytes", "comm/ddp_bytes", "comm/syncs", "comm/period", "lsgd/leader"):
        assert tag in tags


def test_progress_bar_shows_steps_to_next_sync_and_monitor_values(tmp_path):
    from dist import run_ranks

    run_ranks("progress_bar.py", tmp_path, timeout=300)
    bars = torch.load(tmp_path / "rank0.pt")
    # warmup 2 steps, then syncs after steps 5 and 8
    assert [b["sync_in"] for b in bars] == ["warmup", 3, 2, 1, 3, 2, 1, 3]
    assert all(b["gnorm"] > 0 for b in bars)
