"""OverlappedGradSum on a raw 2-process gloo group: sums match a plain all-reduce and start in backward."""

from __future__ import annotations

import json

from dist import run_ranks


def test_overlapped_sums_match_all_reduce_and_start_during_backward():
    outs = run_ranks("overlap_grad_sum.py", world_size=2, timeout=120)
    results = [json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:]) for out in outs]
    for r in results:
        assert r["buckets"] >= 4
        assert r["launched_in_backward"] >= 1  # overlap: some buckets were all-reduced before backward ended
        assert r["err_all_used"] <= 1e-6 and not r["late_all_used"]
        assert r["err_unused"] <= 1e-6  # a parameter without a gradient on one rank contributes zeros there
        assert r["late_double_backward"]  # the caller is told to reduce again
        assert r["launched_unarmed"] == 0
        # judged on this rank's own buckets: rank 0 stays finite though the first bucket's sums are NaN
        assert r["sent_in_backward"] >= 1 and r["finite_clean"] and r["views_err"] <= 1e-6
        assert r["first_bucket_sum_nan"] and r["finite_nan_on_rank_1"] == (r["rank"] == 0)
        assert not r["late_in_nan_step"]
        assert r["finite_overflowing_norm"]  # a norm overflowing float32 is checked element by element
        assert not r["finite_late_nan"] and r["late"]  # a NaN after the bucket left is still seen
        # the trailer (non-finite flags, counts) rides in the last bucket: one collective per bucket, no more
        assert r["collectives_with_trailer"] == r["buckets"] and r["err_trailer"] <= 1e-6
        assert r["trailer"] == [3.0, 0.25, 6.0] and r["trailer_second_step"] == [4.0, 0.0, 2.0]
        assert r["flat_collectives"] == r["flat_buckets"] >= 2 and r["err_flat"] <= 1e-6 and r["t32"] == [3.0, 3.0]
        assert r["flat_collectives_f64"] == r["flat_buckets"] + 1 and r["t64_exact"]  # float64 never rounded to 32
