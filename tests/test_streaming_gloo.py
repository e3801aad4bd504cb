"""Streamed Local SGD on 2 gloo processes: the asynchronous collectives (an all-reduce in float32, an all-gather of
int8 payloads) give the float64 reference's trajectory and identical anchors on both ranks. The rules themselves
are checked in process in ``test_streaming.py``."""

import pytest
import torch
from dist import run_ranks
from reference import streaming_diloco

pytestmark = pytest.mark.timeout(200)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("streaming_gloo")
    run_ranks("streaming_gloo.py", out, timeout=180)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_float32_stream_on_gloo_follows_the_reference(runs):
    ref = streaming_diloco(4, 12, [(0, 64), (64, 129)], [2, 4], 1, 0.6, "sgd", 0.7, 0.6, True)
    for rank in (0, 1):
        torch.testing.assert_close(runs[rank]["fp32"]["params"].double(), ref[rank], atol=3e-6, rtol=1e-5)


def test_int8_stream_on_gloo_ends_on_one_consensus_close_to_float32(runs):
    # fit's weights are the anchors after the in-flight fragment is flushed: the same bits on both ranks
    assert torch.equal(runs[0]["int8"]["final"], runs[1]["int8"]["final"])
    torch.testing.assert_close(runs[0]["int8"]["final"], runs[0]["fp32"]["final"], atol=2e-2, rtol=0)
    assert not torch.equal(runs[0]["int8"]["final"], runs[0]["fp32"]["final"])
    fp32, int8 = runs[0]["fp32"]["comm"], runs[0]["int8"]["comm"]
    # 6 fragment syncs: fragment 0 = 64 values, fragment 1 = 65; int8 adds one block scale; 2 flags each
    assert fp32["comm/bytes"] == 3 * (64 * 4 + 8) + 3 * (65 * 4 + 8)
    assert int8["comm/bytes"] == 3 * (64 + 12) + 3 * (65 + 12)
    assert int8["comm/peak_bytes_per_sync"] == 65 + 12
