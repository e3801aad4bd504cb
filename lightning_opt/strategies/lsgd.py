"""LSGD: leader stochastic gradient descent, single- and multi-leader."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_opt._validation import check_choice, check_float, check_int, invalid
from lightning_opt.distributed import all_gather_vector, broadcast_flat, is_dist
from lightning_opt.strategies.periodic import PeriodicSyncStrategy
from lightning_opt.strategies.schedules import PeriodSchedule


class LSGDStrategy(PeriodicSyncStrategy):
    r"""Leader SGD (Teng et al. 2019, eq. (1)–(3) and Alg. 1).

    Workers take local optimizer steps. At a communication step every worker scores itself with its mean training
    loss over the last ``leader_window`` batches; the leader :math:`\tilde x` is the arg-min (ties → lowest rank;
    non-finite scores, or non-finite parameters, never lead) and every worker moves

    .. math:: x \leftarrow x - \lambda (x - \tilde x).

    Multi-leader: workers form groups of ``group_size`` consecutive ranks (default: one group per node). Every
    ``period`` (τ) steps each worker is pulled toward its *group* leader with ``pull`` (λ); every ``global_period``
    (τ_G, a multiple of τ) it is then pulled toward the *global* leader with ``global_pull`` (λ_G). The paper used
    τ = 64, τ_G = 128, λ ∈ {0.025 … 0.5}, λ_G = λ, and a window of 10 (CIFAR-10) or 64 (ImageNet) batches. Unlike
    elastic averaging (EASGD), the LSGD objective keeps the stationary points of the original problem.

    Communication per sync: one all-gather of the scores, one broadcast of the leader's parameters (and
    floating-point buffers, which follow the same pull) in flat buckets from the leader rank within its group.

    **Several optimizers** (e.g. a GAN's generator and discriminator): x is every optimizer's parameters together.
    Syncs follow the *last* optimizer's step count (the one that steps last in a batch, so the batch ends with the
    pulled x) and pull all parameters toward one leader: a worker's generator and discriminator always come from
    the same leader.

    **Scores** come from the loss the first optimizer's training closure returns (automatic optimisation). Under
    manual optimisation, and so with several losses, the strategy reads ``trainer.callback_metrics[score_key]``
    after the first optimizer's step: log the loss that should rank the workers under that name (e.g. the sum
    of the generator's and discriminator's losses, or only the one you select models by).

    **Non-finite parameters** (``nonfinite``): ``"raise"`` raises :class:`NonFiniteError` on every rank at the
    sync, naming the ranks and the step; ``"drop"`` keeps such a worker out of the leader election and resets it
    to its leader (λ = 1, optimizer state cleared) with a warning. The same meaning as in the other strategies.

    ``eval_weights``: ``"center"`` (default, the mean of all workers as in the paper's experiments),
    ``"leader"`` (the current global leader's weights) or ``"local"`` (each rank's own weights). Evaluation and
    saved weights use them without changing the training trajectory.

    Other arguments (``warmup_steps``, ``nonfinite``, ``bucket_cap_mb``, ``timeout``, ``start_method``, Lightning's
    ``DDPStrategy`` arguments): see :class:`~lightning_opt.strategies.periodic.PeriodicSyncStrategy`.
    """

    strategy_name = "lsgd"
    _one_sync_for_all_optimizers = True  # one leader for all optimizers' parameters (class docstring)
    _shared_state = {"local_syncs": "_local_syncs", "last_leader": "last_leader"}
    _rank_state = {"window": "_window", "filled": "_filled"}  # each rank's own recent losses

    def __init__(
        self,
        period: int | PeriodSchedule = 64,
        pull: float = 0.1,
        leader_window: int = 10,
        group_size: int | None = None,
        global_period: int | None = None,
        global_pull: float | None = None,
        eval_weights: str = "center",
        score_key: str = "train/loss",
        **kwargs: Any,
    ) -> None:
        self.pull = check_float("pull", pull, 0.0, 1.0, low_open=True)
        self.global_pull = self.pull if global_pull is None else check_float("global_pull", global_pull, 0.0, 1.0,
                                                                              low_open=True)
        self.leader_window = check_int("leader_window", leader_window, 1)
        self.group_size = None if group_size is None else check_int("group_size", group_size, 1)
        self.eval_weights = check_choice("eval_weights", eval_weights, ("center", "leader", "local"))
        if not isinstance(score_key, str) or not score_key:
            raise invalid("score_key", score_key, "a non-empty metric name")
        self.score_key = score_key
        super().__init__(period=period, **kwargs)
        base = getattr(self.schedule, "period", None)
        if global_period is not None:
            check_int("global_period", global_period, 1)
            if base is None:
                raise invalid("global_period", global_period, f"None with period={self.schedule!r}: a global "
                              "period needs a fixed integer `period` (global pulls happen every global_period / "
                              "period local syncs)")
            if global_period % base:
                raise invalid("global_period", global_period, f"a multiple of `period` ({base})")
        self.global_period = global_period
        self._window = torch.full((self.leader_window,), float("nan"))
        self._filled = 0
        self._local_syncs = 0
        self._groups: list[list[int]] | None = None
        self._my_group: Any = None
        self.last_leader: int | None = None
        self.history: list[dict[str, Any]] = []

    @property
    def _sync_reaches_consensus(self) -> bool:  # type: ignore[override]
        # Workers pulled with λ < 1 stay apart: the centre / leader must still be built for evaluation.
        return self.eval_weights == "local"

    # ------------------------------------------------------------------ groups
    def setup_environment(self) -> None:
        super().setup_environment()
        self._resolved_group_size()  # world-size checks at setup, not at the first sync

    def _resolved_group_size(self) -> int:
        size = self.group_size if self.group_size is not None else max(1, self.num_processes)
        if self.world % size:
            raise invalid("group_size", size, f"a divisor of the world size ({self.world} processes)")
        return size

    def _global_every(self) -> int:
        """Global pulls happen every this many local syncs (0: never, i.e. one group and no global period)."""
        base = getattr(self.schedule, "period", 1)
        if self.global_period is not None:
            return self.global_period // base
        return 0 if self._resolved_group_size() == self.world else 2

    def _ensure_groups(self) -> None:
        if self._groups is not None:
            return
        size = self._resolved_group_size()
        self._groups = [list(range(s, s + size)) for s in range(0, self.world, size)]
        if is_dist() and 1 < size < self.world:
            for ranks in self._groups:  # every rank creates every subgroup, in the same order
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    self._my_group = group

    # ------------------------------------------------------------------ scores
    def _after_inner_step(self, idx: int, step: int, output: Any) -> None:
        if idx != 0:
            return
        loss = output
        if not isinstance(loss, Tensor):
            loss = None if self._trainer is None else self._trainer.callback_metrics.get(self.score_key)
        if isinstance(loss, Tensor):
            if self._window.device != loss.device:
                self._window = self._window.to(loss.device)
            # device-side write: no host sync per step
            self._window[self._filled % self.leader_window] = loss.detach().float().reshape(-1)[0]
            self._filled += 1

    def _window_score(self) -> float:
        """Mean loss over the window; ``inf`` (never leads) when empty or non-finite."""
        n = min(self._filled, self.leader_window)
        if n == 0:
            return float("inf")
        score = float(self._window[:n].mean())
        return score if score == score and abs(score) != float("inf") else float("inf")

    @staticmethod
    def _argmin(scores: Tensor, ranks: list[int]) -> int | None:
        sub = scores[ranks]
        if not torch.isfinite(sub).any():
            return None
        return ranks[int(torch.argmin(sub))]  # first minimum: ties go to the lowest rank

    # ------------------------------------------------------------------ sync
    def _sync(self, idx: int, step: int) -> None:
        self._ensure_groups()
        tensors = self._pulled_tensors()
        # One agreement carries the non-finite flags and, as each rank's slot of a summed vector, the scores.
        mine = torch.zeros(self.world, device=self.root_device)
        mine[self.rank] = self._window_score()
        agreement = self._agree(tensors, "parameters", step, total=False, payload=mine)
        scores = agreement.payload.cpu()
        scores[agreement.bad] = float("inf")  # a rank with non-finite parameters never leads
        self._local_syncs += 1
        my_group = next(g for g in self._groups if self.rank in g)
        glob = self._argmin(scores, list(range(self.world)))
        broken = agreement.local_bad  # under nonfinite="drop": reset to the first leader it meets
        if len(my_group) == self.world:  # one group: the group leader is the global leader
            self._pull_toward(tensors, glob, self.pull, None, step, broken)
        else:
            if len(my_group) > 1:
                leader = self._argmin(scores, my_group)
                broken = self._pull_toward(tensors, leader, self.pull, self._my_group, step, broken)
            every = self._global_every()
            if every and self._local_syncs % every == 0:
                self._pull_toward(tensors, glob, self.global_pull, None, step, broken)
        self.last_leader = glob
        self._log_sync(step, scores, glob)

    def _pulled_tensors(self) -> list[Tensor]:
        """Every optimizer's parameters (each once) and the floating-point buffers that differ between ranks (a
        collective); identical ones (masks, tables) need no pull, and a ``-inf`` mask would turn into NaN under
        one."""
        params = {id(p): p for idx in range(len(self.optimizers)) for p in self._opt_params(idx)}
        return list(params.values()) + [b for b in self._buffers_to_sync() if b.is_floating_point()]

    def _pull_toward(self, tensors: list[Tensor], leader: int | None, lam: float, group: Any, step: int,
                     broken: bool) -> bool:
        """x ← x − λ(x − x̃) toward ``leader`` within ``group``; a ``broken`` rank (non-finite, dropped) is reset to
        the leader instead (λ = 1, optimizer state cleared). Returns whether this rank is still broken."""
        if leader is None:
            warnings.warn(f"LSGD: no finite score at optimizer step {step}; skipping the pull", stacklevel=2)
            return broken
        leader_values = [t.detach().clone() for t in tensors]
        if is_dist():
            broadcast_flat(leader_values, src=leader, meter=self.meter, group=group, cap_mb=self.bucket_cap_mb)
        if self.rank == leader:
            return False
        with torch.no_grad():
            if broken or lam == 1.0:  # λ = 1 (or a reset under nonfinite="drop") copies the leader exactly
                if broken:
                    warnings.warn(f"LSGD: rank {self.rank} has non-finite parameters at optimizer step {step}; "
                                  f"dropped from the leader election and reset to its leader (rank {leader})",
                                  stacklevel=2)
                    self._clear_optimizer_states()
                torch._foreach_copy_(tensors, leader_values)
            else:
                pull_(tensors, leader_values, lam)
        return False

    def _log_sync(self, step: int, scores: Tensor, leader: int | None) -> None:
        finite = scores[torch.isfinite(scores)]
        spread = float(finite.max() - finite.min()) if finite.numel() else float("nan")
        info = {"lsgd/leader": float(-1 if leader is None else leader), "lsgd/score_spread": spread,
                "lsgd/leader_score": float(scores[leader]) if leader is not None else float("nan")}
        self.history.append({"step": step, "scores": scores.tolist(), "leader": leader})
        self._log_metrics({**info, **self.comm_stats})

    # ------------------------------------------------------------------ consensus
    def _consensus(self) -> list[Tensor]:
        if self.eval_weights == "center":
            return super()._consensus()
        tensors = self._module_tensors()
        values = [t.detach().clone() for t in tensors]
        if self.eval_weights == "leader" and is_dist():
            params = list(self.lightning_module.parameters())
            score = float("inf") if self._buffer_rules.corrupt(params) else self._window_score()
            scores = all_gather_vector(torch.tensor([score], device=self.root_device)).reshape(-1).cpu()
            leader = self._argmin(scores, list(range(self.world)))
            broadcast_flat(values, src=0 if leader is None else leader, cap_mb=self.bucket_cap_mb)
        return values

    def __repr__(self) -> str:
        return (f"LSGDStrategy(period={self.schedule!r}, pull={self.pull}, leader_window={self.leader_window}, "
                f"group_size={self.group_size}, global_period={self.global_period}, global_pull={self.global_pull})")


def pull_(x: list[Tensor], leader: list[Tensor], lam: float) -> None:
    """x ← x − λ(x − x̃) in place (Teng et al. 2019, eq. (3)), written as x + λ(x̃ − x)."""
    torch._foreach_add_(x, torch._foreach_sub(leader, x), alpha=lam)
