"""NaN / Inf injected on one rank (issue 13), for every strategy and every optimizer, on 2 gloo processes.

Rank 1 gets either non-finite *gradients* (its step-6 loss times +inf) or a NaN *parameter* (written after step 5);
period 4, so the syncs are after steps 4 and 8. The documented policies:

* strategy ``nonfinite="raise"``: :class:`NonFiniteError` on every rank, naming the rank and the step;
* strategy ``nonfinite="drop"``: the bad rank is left out of the average and reset to the consensus;
* LSGD: a rank with non-finite parameters or scores never leads; non-finite parameters meet the policy at the
  sync (``raise``: the error above; ``drop``: reset to its leader);
* Lookahead ``mode="sync"``: gradients are averaged every step, so the policy acts at that average (step 6);
* the package optimizers, ``nonfinite="skip"``: the step is skipped (counted); ``"raise"``:
  :class:`NonFiniteGradientError` on the rank that saw it, parameters untouched.

Whatever happens, the healthy rank 0 is never poisoned. One rank-script invocation per strategy runs all its cases
(``tests/scripts/nonfinite_runs.py``).
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
# The last case of each invocation: the optimizer raises on rank 1 alone, so rank 0's next collective fails.
TERMINAL = {"local_sgd": "clipped_raise-grad-drop", "diloco": "acclip_raise-grad-raise",
            "lsgd": "clipped_raise-grad-raise", "lookahead_local": "acclip_raise-grad-drop",
            "lookahead_sync": "sgdm-param-drop"}
SPECS = {s: [*CASES, TERMINAL[s]] for s in ["local_sgd", "diloco", "lsgd", "lookahead_local"]}
SPECS["lookahead_sync"] = [*SYNC_CASES, "clipped_raise-grad-raise", "clipped_raise-grad-drop",
                           TERMINAL["lookahead_sync"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(strategy):
        if strategy not in cache:
            out = tmp_path_factory.mktemp(f"nonfinite_{strategy}")
            run_ranks("nonfinite_runs.py", out, strategy, *SPECS[strategy], timeout=380)
            cache[strategy] = [torch.load(out / f"{strategy}_rank{r}.pt", weights_only=False) for r in (0, 1)]
        return cache[strategy]

    return get


def _finite(t):
    return bool(torch.isfinite(t).all())


def _healthy_rank_never_poisoned(r0):
    assert r0["params"].shape[0] >= 5
    assert all(_finite(p) for p in r0["params"]) and all(_finite(b) for b in r0["bn"])
    assert r0["final_finite"] and r0["opt_state_finite"] is not False
    assert not any("excluded from the average" in w or "reset to its leader" in w for w in r0["warnings"])


def _assert_raised_everywhere(r0, r1, step, what):
    for r in (r0, r1):
        assert r["error_type"] == "NonFiniteError", r["error"]
        assert f"non-finite {what} on rank(s) [1] at optimizer step {step}" in r["error"]


def _assert_reset_at_step_8(r0, r1):
    """Rank 1 was non-finite before the sync at step 8 and equal to the (finite) consensus after it."""
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert not _finite(r1["params"][6])  # step 7: still poisoned ...
    assert torch.equal(r1["params"][7], r0["params"][7]) and _finite(r1["params"][7])  # ... reset at step 8
    assert torch.equal(r1["bn"][7], r0["bn"][7]) and _finite(r1["bn"][7])  # BatchNorm statistics too
    assert all(_finite(p) for p in r1["params"][7:]) and r1["final_finite"] and r1["opt_state_finite"]


def _assert_step_skipped(r0, r1):
    """A guarded optimizer skipped rank 1's non-finite step 6: parameters unchanged, counted, nobody raised."""
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert r1["nonfinite_steps"] == 1 and r0["nonfinite_steps"] == 0
    assert torch.equal(r1["params"][5], r1["params"][4])
    assert any("step skipped" in w for w in r1["warnings"])
    assert all(_finite(p) for p in r1["params"]) and r1["final_finite"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("strategy", AVERAGING)
def test_averaging_strategies(runs, strategy, case):
    r0, r1 = (d[case] for d in runs(strategy))
    opt, inject, policy = case.split("-")
    _healthy_rank_never_poisoned(r0)
    if opt in GUARDED and inject == "grad":
        _assert_step_skipped(r0, r1)
        assert torch.equal(r0["params"][7], r1["params"][7])  # and the sync at step 8 went ahead
    elif policy == "raise":
        _assert_raised_everywhere(r0, r1, 8, "parameters")
        assert r0["params"].shape[0] == r1["params"].shape[0] == 7  # stopped at the sync, before writing it
    else:
        _assert_reset_at_step_8(r0, r1)
        assert any("non-finite parameters at optimizer step 8; excluded from the average" in w
                   for w in r1["warnings"])


@pytest.mark.parametrize("case", CASES)
def test_lsgd_nonfinite_rank_never_leads_then_raises_or_is_reset(runs, case):
    r0, r1 = (d[case] for d in runs("lsgd"))
    opt, inject, policy = case.split("-")
    _healthy_rank_never_poisoned(r0)
    # rank 1 has the lower (offset) loss, so it leads at step 4; at step 8 its score is +inf
    for r in (r0, r1):
        assert r["history"][0]["leader"] == 1
    if opt in GUARDED and inject == "grad":  # finite weights but an infinite loss in the window: pulled, not reset
        _assert_step_skipped(r0, r1)
        for r in (r0, r1):
            assert [h["leader"] for h in r["history"]] == [1, 0]
            assert r["history"][1]["scores"][1] == float("inf") and r["history"][1]["scores"][0] < float("inf")
        assert not torch.equal(r1["params"][7], r0["params"][7])
    elif policy == "raise":  # the same meaning as in the averaging strategies
        _assert_raised_everywhere(r0, r1, 8, "parameters")
        assert r0["params"].shape[0] == r1["params"].shape[0] == 7
    else:
        for r in (r0, r1):
            assert [h["leader"] for h in r["history"]] == [1, 0]
        _assert_reset_at_step_8(r0, r1)
        assert any("rank 1 has non-finite parameters at optimizer step 8; dropped from the leader election and "
                   "reset to its leader (rank 0)" in w for w in r1["warnings"])


@pytest.mark.parametrize("case", [c for c in SYNC_CASES if c.endswith("raise")] + ["clipped_raise-grad-raise"])
def test_lookahead_sync_raise_at_the_gradient_average(runs, case):
    r0, r1 = (d[case] for d in runs("lookahead_sync"))
    _healthy_rank_never_poisoned(r0)
    _assert_raised_everywhere(r0, r1, 6, "gradients")  # before any optimizer (even a raising one) saw them


@pytest.mark.parametrize("case", [c for c in SYNC_CASES if c.endswith("drop")] + ["clipped_raise-grad-drop"])
def test_lookahead_sync_drop_excludes_the_bad_gradient(runs, case):
    r0, r1 = (d[case] for d in runs("lookahead_sync"))
    _healthy_rank_never_poisoned(r0)
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert all(_finite(p) for p in r1["params"]) and r1["final_finite"]
    assert r1["nonfinite_steps"] in (None, 0)  # the optimizer only ever saw the healthy rank's gradient
    assert any("non-finite gradients at optimizer step 6; excluded" in w for w in r1["warnings"])


@pytest.mark.parametrize("case", ["sgdm-grad-drop", "adam-grad-drop", "clipped-grad-drop", "acclip-grad-drop"])
def test_lookahead_sync_drop_keeps_fast_weights_identical(runs, case):
    r0, r1 = (d[case] for d in runs("lookahead_sync"))
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))


def test_lookahead_sync_drop_resets_a_nan_parameter(runs):
    r0, r1 = (d["sgdm-param-drop"] for d in runs("lookahead_sync"))
    _assert_reset_at_step_8(r0, r1)


def test_lookahead_sync_nan_parameter_never_poisons_the_healthy_rank(runs):
    r0, _ = (d["sgdm-param-drop"] for d in runs("lookahead_sync"))
    _healthy_rank_never_poisoned(r0)


@pytest.mark.parametrize("strategy", ["local_sgd", "diloco", "lsgd", "lookahead_local"])
def test_optimizer_raise_stops_the_bad_rank_and_never_poisons_the_other(runs, strategy):
    """Local steps: a raising optimizer fails on rank 1 alone (parameters untouched); rank 0 then fails at its next
    collective (its peer is gone) instead of training on or averaging anything non-finite."""
    r0, r1 = (d[TERMINAL[strategy]] for d in runs(strategy))
    assert r1["error_type"] == "NonFiniteGradientError" and "non-finite gradient" in r1["error"]
    assert "at step 6" in r1["error"] and r1["nonfinite_steps"] == 1
    assert r1["params"].shape[0] == 5 and all(_finite(p) for p in r1["params"]) and r1["final_finite"]
    assert r0["error"] is not None
    _healthy_rank_never_poisoned(r0)
