"""Compatibility matrix (issue 23): every strategy × architectures nobody here wrote and structural cases, on 2
gloo processes (``tests/scripts/arch_zoo.py``: one launch for the whole matrix, 4 steps with 2 syncs and a
mid-period validation per cell). A cell trains, with identical finite consensus weights on both ranks, or fails at
setup with an error naming the unsupported feature. The table is printed in docs/COMPATIBILITY.md."""

import json

import pytest
from dist import run_ranks

pytestmark = pytest.mark.timeout(600)

MODELS = ["timm_vit", "timm_convnext", "resnet18", "gpt2", "char_transformer", "frozen", "unused", "tied",
          "weight_norm", "compiled", "sparse_embedding"]
STRATEGIES = ["local_sgd", "lsgd", "lookahead_sync", "lookahead_local", "easgd"]
# cell -> the words the setup error must contain
REFUSED = {("sparse_embedding", "lookahead_sync"): "sparse gradients (nn.Embedding(sparse=True)"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    run_ranks("arch_zoo.py", out, world_size=2, timeout=580)
    return lambda cell, rank: json.loads((out / f"{cell[0]}:{cell[1]}.rank{rank}.json").read_text())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("model", MODELS)
def test_cell(results, model, strategy):
    r0, r1 = results((model, strategy), 0), results((model, strategy), 1)
    if (model, strategy) in REFUSED:
        for r in (r0, r1):
            assert r["status"] == "error" and REFUSED[model, strategy] in r["error"], r
        return
    assert r0["status"] == r1["status"] == "ok", (r0.get("trace") or r0.get("error"), r1.get("error"))
    assert r0["finite"] and r1["finite"]
    assert r0["digest"] == r1["digest"]  # the consensus fit() hands back is the same model on every rank
