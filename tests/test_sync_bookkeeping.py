"""In process, by value: the bookkeeping around a sync that the multi-process tests only reach indirectly — bucket
splits and trailers of ``all_reduce_flat``, the per-parameter state a param-group change realigns, the cached
parameter view, gradients of parameters that only some ranks use (threaded ranks), and the products a capped
SharpnessMonitor measurement can afford. Fast, so ``make mutate`` runs them."""

from __future__ import annotations

import pytest
import torch
from scripts._common import TinyModel, pl
from threaded import run_threaded, trainer

from lightning_opt.callbacks._sharpness_schedule import CostModel
from lightning_opt.distributed.buckets import all_reduce_flat, rides_with
from lightning_opt.strategies import LocalSGDStrategy
from lightning_opt.strategies._averaging import SyncAveraging, realign

pytestmark = pytest.mark.timeout(120)


def test_all_reduce_flat_splits_at_the_cap_and_keeps_a_trailer_on_one_process():
    mb = 2**20
    tensors = [torch.full((int(0.4 * mb) // 4,), float(i + 1)) for i in range(3)]  # 0.4 MB each
    trailer = torch.tensor([1.0, 2.0])
    buckets = all_reduce_flat(tensors, cap_mb=1.0, trailer=trailer)
    assert [idx for idx, _ in buckets] == [[0, 1], [2]]  # 0.8 MB fits under 1 MB, 1.2 MB does not
    assert [flat.numel() for _, flat in buckets] == [2 * tensors[0].numel(), tensors[0].numel()]  # trailer cut off
    torch.testing.assert_close(buckets[0][1], torch.cat(tensors[:2]))
    assert torch.equal(trailer, torch.tensor([1.0, 2.0]))  # one process: nothing summed
    assert [idx for idx, _ in all_reduce_flat(tensors, cap_mb=2.0)] == [[0, 1, 2]]
    half = [t.to(torch.bfloat16) for t in tensors[:1]]
    assert all_reduce_flat(half)[0][1].dtype == torch.float32  # half precision is summed in fp32


def test_a_trailer_rides_only_in_a_bucket_that_holds_it_exactly():
    f32, f64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    cpu = torch.device("cpu")
    assert rides_with(f32, torch.float32, cpu) and rides_with(f32, torch.float64, cpu)
    assert not rides_with(f64, torch.float32, cpu)  # a float64 score would be rounded
    assert not rides_with(f32, torch.int64, cpu)
    assert not rides_with(f32, torch.float32, torch.device("meta"))


def test_realign_keeps_the_state_of_parameters_that_stay_and_starts_new_ones_fresh():
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    values = [torch.tensor([1.0]), torch.tensor([2.0])]
    out = realign(values, [a, b], [b, c], fresh=lambda p: torch.tensor([9.0]))
    assert out[0] is values[1] and torch.equal(out[1], torch.tensor([9.0]))


class _Host(SyncAveraging):
    """SyncAveraging's parameter view on a bare optimizer (the strategy supplies ``optimizers``)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.optimizers, self._param_views, self.changes = [opt], {}, []

    def _params_changed(self, idx, old, new):
        self.changes.append((len(old), len(new)))


def test_the_parameter_view_is_cached_until_the_groups_change():
    w, b, x, y = (torch.nn.Parameter(torch.zeros(n)) for n in (6, 2, 3, 5))
    b.requires_grad_(False)
    opt = torch.optim.SGD([w, b], lr=0.1)
    host = _Host(opt)
    params, nbytes = host._param_view(0)
    assert params == [w, b] and nbytes == 6 * 4  # the frozen bias is not DDP's payload
    assert host._param_view(0)[0] is params and host.changes == []  # cached
    opt.add_param_group({"params": [x]})
    assert host._param_view(0) == ([w, b, x], 9 * 4) and host.changes == [(2, 3)]
    opt.param_groups[1]["params"] = [y]  # same number of groups and of parameters, another list
    assert host._param_view(0) == ([w, b, y], 11 * 4) and host.changes == [(2, 3), (3, 3)]


def test_a_gradient_some_ranks_lack_is_averaged_as_ddp_does():
    """Warm-up steps average gradients. ``extra`` is used by rank 1 only (its gradient: ones): both ranks step with
    (1 + 0) / 2, DDP's mean with zeros for the rank without one; ``unused`` has a gradient on no rank and keeps
    ``grad=None`` (the optimizer skips it)."""

    class Partial(TinyModel):
        def __init__(self):
            super().__init__(bn=False)
            self.extra = torch.nn.Parameter(torch.zeros(3))
            self.unused = torch.nn.Parameter(torch.zeros(2))

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss + self.extra.sum() if self.global_rank == 1 else loss

    class Seen(pl.Callback):
        def __init__(self):
            self.grads = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.grads.append((pl_module.extra.grad.clone(), pl_module.unused.grad))

    models = [Partial(), Partial()]
    seen = [Seen(), Seen()]

    def rank_fn(rank: int):
        trainer(2, rank, LocalSGDStrategy(period=2, warmup_steps=3), 3, [seen[rank]]).fit(models[rank])

    run_threaded(2, rank_fn)
    for rank in range(2):
        for extra_grad, unused_grad in seen[rank].grads:
            assert torch.equal(extra_grad, torch.full((3,), 0.5)) and unused_grad is None
        torch.testing.assert_close(models[rank].extra.detach(), torch.full((3,), -3 * 0.05 * 0.5))


def test_cost_model_affords_the_products_its_calibrated_line_allows():
    cost = CostModel()
    assert cost.affordable(10.0) == 0  # not timed yet
    cost.timed(0.1, 0.02, 41, extra=1)
    assert cost.affordable(0.6032) == 25 and cost.affordable(0.05) == 0
    cost.observe(0.8, 15)  # twice the line's 0.1 + 15 * 0.02 = 0.4 s: every product is dearer by that factor
    assert cost.affordable(0.61) == 10  # floor((0.61 / 2 - 0.1) / 0.02)
    cost.observe(0.4, 15)  # mean 0.6 s for 15 products: 1.5 times the line
    assert cost.affordable(0.61) == 15  # floor((0.61 / 1.5 - 0.1) / 0.02)
