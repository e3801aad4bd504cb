"""NaN / Inf injected on one rank (issue 13), for every strategy and every optimizer, on gloo processes; the
policies checked by value (issue 27).

Rank 1 gets either non-finite *gradients* (its step-6 loss times +inf) or a NaN *parameter* (written after step 5);
period 4, so the syncs are after steps 4 and 8. Local SGD and DiLoCo run on 3 ranks (so the healthy count, 2,
differs from both the world size and the number of bad ranks), the others on 2. The documented policies:

* strategy ``nonfinite="raise"``: :class:`NonFiniteError` on every rank, naming the rank and the step;
* strategy ``nonfinite="drop"``: the bad rank is left out of the average and reset to the consensus: every rank's
  weights after the sync are, in float64 from the recorded pre-sync weights, the sum of the healthy ranks' weights
  over the healthy count (then the outer step, with an outer optimizer); the float buffers likewise; the dropped
  rank's optimizer state is cleared, the others' kept;
* on the steps that average gradients (``warmup_steps``, Lookahead ``mode="sync"``) every rank steps with the
  healthy ranks' mean gradient (the optimizer's gradient checked against each rank's recorded local gradient, and
  SGD-momentum weights replayed from it);
* LSGD: a rank with non-finite parameters or scores never leads; non-finite parameters meet the policy at the
  sync (``raise``: the error above; ``drop``: reset to its leader exactly, the healthy rank pulled by λ);
* Lookahead ``mode="sync"``: gradients are averaged every step, so the policy acts at that average (step 6);
* the package optimizers, ``nonfinite="skip"``: the step is skipped (counted); ``"raise"``:
  :class:`NonFiniteGradientError` on the rank that saw it, parameters untouched.

Whatever happens, the healthy ranks are never poisoned. One rank-script invocation per strategy runs all its
cases (``tests/scripts/nonfinite_runs.py``).
"""

import pytest
import torch
from dist import run_ranks

pytestmark = pytest.mark.timeout(400)

AVERAGING = ["local_sgd", "diloco", "lookahead_local"]  # the bad rank meets the policy at the sync (step 8)
OPTS = ["sgdm", "adam", "clipped", "acclip"]
GUARDED = {"clipped", "acclip"}  # the package optimizers: nonfinite="skip" by default
CASES = [f"{o}-{i}-{p}" for o in OPTS for i in ("grad", "param") for p in ("raise", "drop")]
# lookahead_sync: a NaN parameter under "drop" is reset at the sync (step 8); it runs last, once
SYNC_CASES = [c for c in CASES if c.split("-")[1:] != ["param", "drop"]]
# local_sgd only: the non-finite gradient of step 6 inside warmup_steps=6 (gradients averaged every step)
WARMUP_CASES = ["sgdm-wgrad-drop", "sgdm-wgrad-raise"]
# The last case of each invocation: the optimizer raises on rank 1 alone, so the others' next collective fails.
TERMINAL = {"local_sgd": "clipped_raise-grad-drop", "diloco": "acclip_raise-grad-raise",
            "lsgd": "clipped_raise-grad-raise", "lookahead_local": "acclip_raise-grad-drop",
            "lookahead_sync": "sgdm-param-drop"}
SPECS = {s: [*CASES, TERMINAL[s]] for s in ["diloco", "lsgd", "lookahead_local"]}
SPECS["local_sgd"] = [*CASES, *WARMUP_CASES, TERMINAL["local_sgd"]]
SPECS["lookahead_sync"] = [*SYNC_CASES, "clipped_raise-grad-raise", "clipped_raise-grad-drop",
                           TERMINAL["lookahead_sync"]]
WORLD = {"local_sgd": 3, "diloco": 3, "lsgd": 2, "lookahead_local": 2, "lookahead_sync": 2}
# the sync's outer step (nonfinite_runs.make_strategy): (outer lr, outer momentum, Nesterov); (1, 0): plain mean
OUTER = {"local_sgd": (1.0, 0.0, False), "diloco": (0.7, 0.9, True), "lookahead_local": (0.3, 0.0, False),
         "lookahead_sync": (0.3, 0.0, False)}
LR, MOMENTUM = 0.05, 0.9  # the "sgdm" optimizer
LSGD_PULL = 0.25


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(strategy):
        if strategy not in cache:
            out = tmp_path_factory.mktemp(f"nonfinite_{strategy}")
            world = WORLD[strategy]
            run_ranks("nonfinite_runs.py", out, strategy, *SPECS[strategy], world_size=world, timeout=380)
            cache[strategy] = [torch.load(out / f"{strategy}_rank{r}.pt", weights_only=False) for r in range(world)]
        return cache[strategy]

    return get


def _case(runs, strategy, case):
    """Every rank's record of ``case``; rank 1 is the bad one."""
    return [d[case] for d in runs(strategy)]


def _finite(t):
    return bool(torch.isfinite(t).all())


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=0)


def _healthy_mean(rows):
    """(float64 sum of the finite rows over their count, the indices of those rows)."""
    healthy = [i for i, row in enumerate(rows) if _finite(row)]
    assert healthy, "no healthy rank"
    return sum(rows[i].double() for i in healthy) / len(healthy), healthy


def _healthy_rank_never_poisoned(r):
    assert r["params"].shape[0] >= 5
    assert all(_finite(p) for p in r["params"]) and all(_finite(b) for b in r["bn"])
    assert r["final_finite"] and r["opt_state_finite"] is not False
    assert not any("excluded from the average" in w or "reset to its leader" in w for w in r["warnings"])


def _healthy_ranks_never_poisoned(rs):
    for r in rs[:1] + rs[2:]:
        _healthy_rank_never_poisoned(r)


def _assert_raised_everywhere(rs, step, what):
    for r in rs:
        assert r["error_type"] == "NonFiniteError", r["error"]
        assert f"non-finite {what} on rank(s) [1] at optimizer step {step}" in r["error"]


def _assert_reset_at_step_8(rs):
    """Rank 1 was non-finite before the sync at step 8 and equal to the (finite) consensus after it."""
    r0, r1 = rs[:2]
    assert all(r["error"] is None for r in rs), [r["error"] for r in rs]
    assert not _finite(r1["params"][6])  # step 7: still poisoned ...
    for r in rs[1:]:
        assert torch.equal(r["params"][7], r0["params"][7]) and _finite(r["params"][7])  # ... reset at step 8
        assert torch.equal(r["bn"][7], r0["bn"][7]) and _finite(r["bn"][7])  # BatchNorm statistics too
    assert all(_finite(p) for p in r1["params"][7:]) and r1["final_finite"] and r1["opt_state_finite"]


def _assert_step_skipped(rs):
    """A guarded optimizer skipped rank 1's non-finite step 6: parameters unchanged, counted, nobody raised."""
    r1 = rs[1]
    assert all(r["error"] is None for r in rs), [r["error"] for r in rs]
    assert r1["nonfinite_steps"] == 1 and all(r["nonfinite_steps"] == 0 for r in rs[:1] + rs[2:])
    assert torch.equal(r1["params"][5], r1["params"][4])
    assert any("step skipped" in w for w in r1["warnings"])
    assert all(_finite(p) for p in r1["params"]) and r1["final_finite"]


def _assert_syncs_by_value(rs, strategy):
    """Every completed sync replayed in float64 from the recorded pre-sync weights of every rank: x̄ = the healthy
    ranks' sum over the healthy count; plain averaging: x ← x̄; outer optimizer (anchor a from x₀, momentum m):
    Δ = a − x̄, m ← μ m + Δ, a ← a − η (Δ + μ m if Nesterov else m), x ← a. Float buffers: x ← their healthy
    mean. The dropped ranks' optimizer state is cleared, the others' kept. Returns the dropped ranks per sync."""
    lr, mu, nesterov = OUTER[strategy]
    anchor = rs[0]["x0"].double()
    momentum = torch.zeros_like(anchor)
    n = len(rs[0]["post"])
    assert all(len(r["post"]) == n and len(r["pre"]) in (n, n + 1) for r in rs)  # n + 1: raised in the last one
    dropped = []
    for k in range(n):
        mean, healthy = _healthy_mean([r["pre"][k] for r in rs])
        if (lr, mu) == (1.0, 0.0):
            expected = mean
        else:
            delta = anchor - mean
            momentum = mu * momentum + delta
            anchor = anchor - lr * (delta + mu * momentum if nesterov else momentum)
            expected = anchor
        buf_mean, _ = _healthy_mean([r["pre_buf"][k] for r in rs])
        for r in rs:
            _close(r["post"][k], expected)
            _close(r["post_buf"][k], buf_mean)
        bad = [i for i in range(len(rs)) if i not in healthy]
        if strategy != "lookahead_sync":  # sync mode copies a healthy rank's state over the bad one instead
            for i, r in enumerate(rs):
                assert (r["post_state"][k] == 0) == (i in bad), (k, i, r["post_state"][k])
        dropped.append(bad)
    return dropped


def _assert_steps_with_the_healthy_mean_gradient(rs, steps):
    """On each (1-based) step in ``steps`` every rank's optimizer got the healthy ranks' mean of the recorded local
    gradients. Returns the ranks left out per step."""
    left_out = []
    for t in steps:
        mean, healthy = _healthy_mean([r["local_grads"][t - 1] for r in rs])
        for r in rs:
            _close(r["used_grads"][t - 1], mean)
        left_out.append([i for i in range(len(rs)) if i not in healthy])
    return left_out


def _assert_sgd_momentum_steps(r, sync_steps):
    """SGD with momentum replayed from the gradients the optimizer got: b ← μ b + g, x ← x − η b (on every step
    but the syncs, which move x afterwards)."""
    buf, grads = None, r["used_grads"].double()
    for t in range(1, len(grads) + 1):
        buf = grads[t - 1] if buf is None else MOMENTUM * buf + grads[t - 1]
        if t not in sync_steps:
            before = r["x0"] if t == 1 else r["params"][t - 2]
            _close(r["params"][t - 1], before.double() - LR * buf)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strategy", AVERAGING)
def test_averaging_strategies(runs, strategy, case):
    rs = _case(runs, strategy, case)
    r0, r1 = rs[:2]
    opt, inject, policy = case.split("-")
    _healthy_ranks_never_poisoned(rs)
    dropped = _assert_syncs_by_value(rs, strategy)  # the sync at step 4 always, and step 8 unless it raised
    if opt in GUARDED and inject == "grad":
        _assert_step_skipped(rs)
        assert dropped == [[], []]  # and the sync at step 8 went ahead with every rank
    elif policy == "raise":
        _assert_raised_everywhere(rs, 8, "parameters")
        assert dropped == [[]]
        assert all(r["params"].shape[0] == 7 for r in rs)  # stopped at the sync, before writing it
        assert not _finite(r1["pre"][1]) and all(_finite(r["pre"][1]) for r in rs[:1] + rs[2:])
    else:
        assert dropped == [[], [1]]
        _assert_reset_at_step_8(rs)
        assert any("non-finite parameters at optimizer step 8; excluded from the average" in w
                   for w in r1["warnings"])


@pytest.mark.parametrize("case", CASES)
def test_lsgd_nonfinite_rank_never_leads_then_raises_or_is_reset(runs, case):
    rs = _case(runs, "lsgd", case)
    r0, r1 = rs
    opt, inject, policy = case.split("-")
    _healthy_ranks_never_poisoned(rs)
    # rank 1 has the lower (offset) loss, so it leads at step 4; at step 8 its score is +inf
    for r in rs:
        assert r["history"][0]["leader"] == 1
    # every completed sync by value: the leader stays, a finite worker is pulled x ← x + λ(x̃ − x), a non-finite
    # one is reset to x̃ exactly (weights and float buffers, which LSGD pulls too)
    for k, h in enumerate(r0["history"][: len(r0["post"])]):
        lead = rs[h["leader"]]
        for i, r in enumerate(rs):
            for pre, post, lpre in ((r["pre"][k], r["post"][k], lead["pre"][k]),
                                    (r["pre_buf"][k], r["post_buf"][k], lead["pre_buf"][k])):
                if i == h["leader"]:
                    assert torch.equal(post, pre)
                elif _finite(r["pre"][k]) and _finite(r["pre_buf"][k]):
                    _close(post, pre.double() + LSGD_PULL * (lpre.double() - pre.double()))
                else:
                    assert torch.equal(post, lpre)
    if opt in GUARDED and inject == "grad":  # finite weights but an infinite loss in the window: pulled, not reset
        _assert_step_skipped(rs)
        for r in rs:
            assert [h["leader"] for h in r["history"]] == [1, 0]
            assert r["history"][1]["scores"][1] == float("inf") and r["history"][1]["scores"][0] < float("inf")
        assert _finite(r1["pre"][1]) and not torch.equal(r1["params"][7], r0["params"][7])
    elif policy == "raise":  # the same meaning as in the averaging strategies
        _assert_raised_everywhere(rs, 8, "parameters")
        assert r0["params"].shape[0] == r1["params"].shape[0] == 7
    else:
        for r in rs:
            assert [h["leader"] for h in r["history"]] == [1, 0]
        assert not _finite(r1["pre"][1]) and r1["post_state"][1] == 0 < r0["post_state"][1]
        _assert_reset_at_step_8(rs)
        assert any("rank 1 has non-finite parameters at optimizer step 8; dropped from the leader election and "
                   "reset to its leader (rank 0)" in w for w in r1["warnings"])


def test_warmup_drop_steps_every_rank_with_the_healthy_mean_gradient(runs):
    """warmup_steps=6 (DDP-like), 3 ranks: at step 6 rank 1's gradient is non-finite, so every rank's optimizer
    gets (g₀ + g₂)/2, on the other warm-up steps (g₀ + g₁ + g₂)/3; the weights are SGD-momentum steps on those."""
    rs = _case(runs, "local_sgd", "sgdm-wgrad-drop")
    assert all(r["error"] is None for r in rs), [r["error"] for r in rs]
    assert _assert_steps_with_the_healthy_mean_gradient(rs, range(1, 7)) == [[], [], [], [], [], [1]]
    for r in rs:
        _assert_sgd_momentum_steps(r, sync_steps={10})
        assert all(_finite(p) for p in r["params"]) and r["final_finite"]
    assert _assert_syncs_by_value(rs, "local_sgd") == [[]]  # the sync after step 6 + 4
    assert any("non-finite gradients at optimizer step 6; excluded" in w for w in rs[1]["warnings"])
    assert not any("excluded" in w for r in rs[:1] + rs[2:] for w in r["warnings"])


def test_warmup_raise_at_the_gradient_average(runs):
    rs = _case(runs, "local_sgd", "sgdm-wgrad-raise")
    _assert_raised_everywhere(rs, 6, "gradients")
    assert all(r["params"].shape[0] == 5 for r in rs)  # nobody stepped with it


@pytest.mark.parametrize("case", [c for c in SYNC_CASES if c.endswith("raise")] + ["clipped_raise-grad-raise"])
def test_lookahead_sync_raise_at_the_gradient_average(runs, case):
    rs = _case(runs, "lookahead_sync", case)
    _healthy_ranks_never_poisoned(rs)
    _assert_raised_everywhere(rs, 6, "gradients")  # before any optimizer (even a raising one) saw them
    assert all(r["params"].shape[0] == 5 for r in rs)


@pytest.mark.parametrize("case", [c for c in SYNC_CASES if c.endswith("drop")] + ["clipped_raise-grad-drop"])
def test_lookahead_sync_drop_excludes_the_bad_gradient(runs, case):
    rs = _case(runs, "lookahead_sync", case)
    r1 = rs[1]
    _healthy_ranks_never_poisoned(rs)
    assert all(r["error"] is None for r in rs), [r["error"] for r in rs]
    assert all(_finite(p) for p in r1["params"]) and r1["final_finite"]
    assert r1["nonfinite_steps"] in (None, 0)  # the optimizer only ever saw the healthy rank's gradient
    assert any("non-finite gradients at optimizer step 6; excluded" in w for w in r1["warnings"])
    left_out = _assert_steps_with_the_healthy_mean_gradient(rs, range(1, 11))
    assert left_out == [[1] if t == 6 else [] for t in range(1, 11)]
    if case.startswith("sgdm"):
        for r in rs:
            _assert_sgd_momentum_steps(r, sync_steps={4, 8})
    assert _assert_syncs_by_value(rs, "lookahead_sync") == [[], []]  # z ← z + α(x − z) on the shared x


@pytest.mark.parametrize("case", ["sgdm-grad-drop", "adam-grad-drop", "clipped-grad-drop", "acclip-grad-drop"])
def test_lookahead_sync_drop_keeps_fast_weights_identical(runs, case):
    r0, r1 = _case(runs, "lookahead_sync", case)
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))


def test_lookahead_sync_drop_resets_a_nan_parameter(runs):
    rs = _case(runs, "lookahead_sync", "sgdm-param-drop")
    _assert_reset_at_step_8(rs)
    # steps 6–8: rank 1's NaN weight makes its gradient NaN, so both ranks step with rank 0's
    assert _assert_steps_with_the_healthy_mean_gradient(rs, range(1, 11)) == [[]] * 5 + [[1]] * 3 + [[]] * 2
    # at the sync rank 0's fast weights are copied over rank 1's, then the slow step runs on them
    assert _assert_syncs_by_value(rs, "lookahead_sync") == [[], [1]]


def test_lookahead_sync_nan_parameter_never_poisons_the_healthy_rank(runs):
    rs = _case(runs, "lookahead_sync", "sgdm-param-drop")
    _healthy_ranks_never_poisoned(rs)


@pytest.mark.parametrize("strategy", ["local_sgd", "diloco", "lsgd", "lookahead_local"])
def test_optimizer_raise_stops_the_bad_rank_and_never_poisons_the_other(runs, strategy):
    """Local steps: a raising optimizer fails on rank 1 alone (parameters untouched); the others then fail at
    their next collective (their peer is gone) instead of training on or averaging anything non-finite."""
    rs = _case(runs, strategy, TERMINAL[strategy])
    r1 = rs[1]
    assert r1["error_type"] == "NonFiniteGradientError" and "non-finite gradient" in r1["error"]
    assert "at step 6" in r1["error"] and r1["nonfinite_steps"] == 1
    assert r1["params"].shape[0] == 5 and all(_finite(p) for p in r1["params"]) and r1["final_finite"]
    for r in rs[:1] + rs[2:]:
        assert r["error"] is not None
    _healthy_ranks_never_poisoned(rs)
