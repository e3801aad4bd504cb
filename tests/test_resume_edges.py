"""Issue 26 §4: a resume says what it is doing (2 gloo processes, one launch: ``tests/scripts/resume_edges.py``)."""

import pytest
import torch
from dist import run_ranks

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_edges")
    run_ranks("resume_edges.py", out, timeout=380)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)], out


def _one(warnings, text):
    return sum(text in w for w in warnings) == 1


def test_another_strategys_checkpoint_resumes_with_a_warning_naming_both_and_what_is_dropped(ranks):
    (r0, r1), out = ranks
    for r in (r0, r1):
        case = r["other_strategy"]
        assert case["error"] is None
        assert _one(case["warnings"], f"{out / 'local' / 'last.ckpt'} was written under LocalSGDStrategy(period=")
        (msg,) = [w for w in case["warnings"] if "was written under" in w]
        assert "outer_momentum=0.9" in msg and "resuming under LookaheadStrategy(period=" in msg
        assert "extra state: anchor, momentum)" in msg  # SlowMo's state is not carried into Lookahead
        assert case["steps"] == {0: 2}  # the counters started afresh: steps 7 and 8 counted as 1 and 2


def test_a_checkpoint_without_our_entry_resumes_with_one_warning(ranks):
    (r0, r1), out = ranks
    for r in (r0, r1):
        assert r["no_entry"]["error"] is None
        assert _one(r["no_entry"]["warnings"], f"{out / 'ddp' / 'last.ckpt'} has no lightning_opt entry")
        assert r["no_entry"]["steps"] == {0: 2}


def test_the_same_strategy_resumes_silently_and_exactly_where_it_stopped(ranks):
    (r0, _), _ = ranks
    case = r0["same_strategy"]
    assert case["error"] is None and case["steps"] == {0: 8}
    assert not any("lightning_opt entry" in w or "was written under" in w for w in case["warnings"])


@pytest.mark.parametrize("case", ["empty", "text"])
def test_a_file_that_is_not_a_checkpoint_is_named(ranks, case):
    (r0, r1), out = ranks
    for r in (r0, r1):
        assert r[case]["error"].startswith(f"not a checkpoint: {out / f'{case}.ckpt'}")


def test_non_finite_saved_weights_are_refused_at_load_on_every_rank(ranks):
    (r0, r1), out = ranks
    for r in (r0, r1):
        assert r["nan"]["error"].startswith(f"{out / 'nan.ckpt'}: non-finite values in rank 1's weights (")
        assert "refusing to resume" in r["nan"]["error"]
