"""Multi-node on one machine (issue 13): ``Trainer(num_nodes=2, devices=2)`` as 4 gloo ranks on loopback with
``NODE_RANK`` 0 / 1 (``run_ranks(..., world_size=4, nodes=2)``), see ``tests/scripts/multinode_runs.py``.

LSGD's default groups are the nodes: at every period each rank is pulled toward its node's leader, and every
second sync (the default global period) additionally toward the global leader; Local SGD averages all 4 ranks.
"""

import pytest
import torch
from dist import run_ranks

pytestmark = pytest.mark.timeout(400)

WORLD = 4
NODE = {0: 0, 1: 0, 2: 1, 3: 1}
GROUP_LEADER = {0: 1, 1: 1, 2: 3, 3: 3}  # the lowest offset loss within each node
GLOBAL_LEADER = 3
PULL = GLOBAL_PULL = 0.5


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("multinode")
    run_ranks("multinode_runs.py", out, world_size=WORLD, nodes=2, timeout=380)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_trainer_sees_two_nodes_of_two_devices(ranks):
    for r, d in enumerate(ranks):
        assert d["topology"] == {"world_size": 4, "num_nodes": 2, "node_rank": NODE[r], "local_rank": r % 2,
                                 "global_rank": r, "num_processes": 2}


def test_lsgd_default_groups_are_the_nodes_with_a_global_pull_every_second_sync(ranks):
    for d in ranks:
        assert d["lsgd"]["groups"] == [[0, 1], [2, 3]]
        assert d["lsgd"]["global_every"] == 2
        assert [h["step"] for h in d["lsgd"]["history"]] == [2, 4, 6, 8]
        assert all(h["leader"] == GLOBAL_LEADER for h in d["lsgd"]["history"])


def test_lsgd_pulls_toward_the_node_leader_every_period_and_the_global_leader_every_global_period(ranks):
    pre = [d["lsgd"]["pre"] for d in ranks]
    post = [d["lsgd"]["post"] for d in ranks]
    for k, step in enumerate([2, 4, 6, 8]):
        # x ← x − λ(x − x_node_leader), from the values every rank had right before the sync
        mid = {r: pre[r][k] + PULL * (pre[GROUP_LEADER[r]][k] - pre[r][k]) for r in range(WORLD)}
        if step % 4:  # local syncs only: the nodes do not talk to each other
            expected = mid
            assert not torch.allclose(post[1][k], post[3][k])
        else:  # then x ← x − λ_G(x − x_global_leader); the global leader leads its node, so it did not move
            expected = {r: mid[r] + GLOBAL_PULL * (mid[GLOBAL_LEADER] - mid[r]) for r in range(WORLD)}
        for r in range(WORLD):
            torch.testing.assert_close(post[r][k], expected[r], atol=1e-6, rtol=0)
        for leader in set(GROUP_LEADER.values()):  # node leaders never move in their own node's pull
            if step % 4:
                assert torch.equal(post[leader][k], pre[leader][k])
        assert torch.equal(post[GLOBAL_LEADER][k], pre[GLOBAL_LEADER][k])


def test_lsgd_node_pull_uses_only_the_own_node(ranks):
    """A rank of node 0 ends a local sync between itself and rank 1, whatever node 1 holds."""
    pre = [d["lsgd"]["pre"] for d in ranks]
    post0 = ranks[0]["lsgd"]["post"][0]
    torch.testing.assert_close(post0, 0.5 * (pre[0][0] + pre[1][0]), atol=1e-6, rtol=0)
    assert not torch.allclose(post0, 0.5 * (pre[0][0] + pre[3][0]))


def test_local_sgd_averages_across_all_four_ranks_of_both_nodes(ranks):
    pre = torch.stack([d["local_sgd"]["pre"] for d in ranks])  # [rank, sync, params]
    post = torch.stack([d["local_sgd"]["post"] for d in ranks])
    assert pre.shape[1] == 3  # syncs after steps 2, 4, 6
    mean = pre.mean(0)
    for r in range(WORLD):
        torch.testing.assert_close(post[r], mean, atol=1e-6, rtol=0)
        assert torch.equal(post[r], post[0])
    # the average mixes the nodes: it is neither node's own average
    for k in range(pre.shape[1]):
        assert not torch.allclose(mean[k], pre[:2, k].mean(0)) and not torch.allclose(mean[k], pre[2:, k].mean(0))
