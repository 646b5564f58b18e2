"""EPLB-style placement (dsv3lab.balance): the README example, invariants checked by hand, modes."""

import pytest
import torch

from dsv3lab.balance import (balanced_packing, balancedness, contiguous_placement, gpu_loads,
                             rebalance_experts, replicate_experts)

# DeepSeek EPLB README example (docs/references.md#eplb): 2 layers, 12 experts, 16 replicas, 4 groups,
# 2 nodes, 8 GPUs
README_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG_0 = [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]


def _check_invariants(weight, phy2log, log2phy, count, num_replicas, num_gpus):
    L, E = weight.shape
    assert phy2log.shape == (L, num_replicas) and count.shape == (L, E)
    assert log2phy.shape == (L, E, num_replicas - E + 1)
    assert (count >= 1).all()
    assert (count.sum(-1) == num_replicas).all()
    for l in range(L):
        # count agrees with phy2log; log2phy lists exactly the slots holding each expert
        assert torch.equal(torch.bincount(phy2log[l], minlength=E), count[l])
        for e in range(E):
            slots = log2phy[l, e][log2phy[l, e] >= 0]
            assert len(slots) == count[l, e]
            assert (phy2log[l, slots] == e).all()
            assert (log2phy[l, e, count[l, e]:] == -1).all()
        # (greedy packing may put two copies of one expert on one GPU, as the reference
        # algorithm does: balanced load, one slot wasted; so that is not checked)
    # every GPU gets num_replicas / num_gpus slots by construction of the slot numbering, and the
    # per-GPU loads add up to the total load
    assert torch.allclose(gpu_loads(weight, phy2log, num_gpus).sum(-1), weight.double().sum(-1))


def test_readme_example_exact():
    phy2log, log2phy, count = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert phy2log[0].tolist() == README_PHY2LOG_0
    _check_invariants(README_WEIGHT, phy2log, log2phy, count, 16, 8)
    # layer 0 by hand: group loads 262, 330, 116, 325 -> node 0 {1, 2} (446), node 1 {3, 0} (587);
    # the extra replica of each node goes to its hottest experts: 5, 4 on node 0; 10, 1 on node 1
    assert count[0].tolist() == [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]


def test_hierarchical_keeps_groups_on_one_node():
    torch.manual_seed(0)
    weight = torch.randint(1, 1000, (5, 32)) * (torch.rand(5, 32) < 0.3).add(1)   # some hot experts
    num_groups, num_nodes, num_gpus, num_replicas = 8, 4, 8, 48
    phy2log, log2phy, count = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    _check_invariants(weight, phy2log, log2phy, count, num_replicas, num_gpus)
    group_size, slots_per_node = 32 // num_groups, num_replicas // num_nodes
    for l in range(5):
        node_of_slot = torch.arange(num_replicas) // slots_per_node
        group_of_slot = phy2log[l] // group_size
        for g in range(num_groups):
            nodes = node_of_slot[group_of_slot == g].unique()
            assert nodes.numel() == 1, f"group {g} spread over nodes {nodes.tolist()}"
        # each node holds whole groups, groups_per_node of them
        for n in range(num_nodes):
            assert group_of_slot[node_of_slot == n].unique().numel() == num_groups // num_nodes


def test_rebalancing_beats_contiguous_on_skewed_load():
    gen = torch.Generator().manual_seed(1)
    # Zipf-like skew, hot experts scattered
    load = (1000.0 / torch.arange(1, 65).double() ** 1.1)[torch.randperm(64, generator=gen)]
    weight = torch.stack([load, load.flip(0)])
    before = balancedness(gpu_loads(weight, contiguous_placement(2, 64), 8))
    phy2log, _, _ = rebalance_experts(weight, 80, 8, 2, 8)
    after = balancedness(gpu_loads(weight, phy2log, 8))
    assert (after > before).all()
    assert (after > 0.9).all()
    g_phy2log, _, _ = rebalance_experts(weight, 80, 1, 2, 8)       # 1 % 2 != 0 -> global mode
    assert (balancedness(gpu_loads(weight, g_phy2log, 8)) >= after - 1e-9).all()


def test_global_mode():
    # num_groups % num_nodes != 0 -> one group, one node: identical to asking for that directly
    a = rebalance_experts(README_WEIGHT, 16, 3, 2, 8)
    b = rebalance_experts(README_WEIGHT, 16, 1, 1, 8)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    _check_invariants(README_WEIGHT, *a, 16, 8)
    # global replication takes the hottest experts overall: 10, 5, 1, 4 in layer 0
    assert sorted(torch.nonzero(a[2][0] == 2).flatten().tolist()) == [1, 4, 5, 10]


def test_no_redundancy_is_a_permutation():
    phy2log, log2phy, count = rebalance_experts(README_WEIGHT, 12, 4, 2, 4)
    assert (count == 1).all()
    assert torch.equal(phy2log.sort(-1).values, torch.arange(12).expand(2, -1))


def test_balanced_packing_by_hand():
    pack, rank = balanced_packing(torch.tensor([[5, 1, 4, 2, 3, 3]]), 2)
    # 5 -> p0 (5), 4 -> p1 (4), 3(i4) -> p1 (7), 3(i5) -> p0 (8), 2 -> p1 (9, now full),
    # 1 -> p0 (the only pack with room)
    assert pack[0].tolist() == [0, 0, 1, 1, 1, 0]
    assert rank[0].tolist() == [0, 2, 0, 2, 1, 1]
    for p in range(2):
        assert (pack[0] == p).sum() == 3


def test_replicate_experts_by_hand():
    phy2log, rank, cnt = replicate_experts(torch.tensor([[10.0, 3.0, 6.0]]), 6)
    # per-copy loads: 10 -> copy 0 (5); 6 -> copy 2 (3); then 5 vs 3 vs 3 -> copy 0 again
    assert phy2log[0].tolist() == [0, 1, 2, 0, 2, 0]
    assert rank[0].tolist() == [0, 0, 0, 1, 1, 2]
    assert cnt[0].tolist() == [3, 1, 2]


def test_gpu_loads_and_balancedness():
    w = torch.tensor([6.0, 2.0, 2.0, 2.0])
    assert gpu_loads(w, torch.tensor([0, 1, 2, 3]), 2).tolist() == [8.0, 4.0]
    # expert 0 replicated twice, one copy on each GPU
    assert gpu_loads(w, torch.tensor([0, 1, 2, 0, 3, 1]), 2).tolist() == [3 + 1 + 2, 3 + 2 + 1]
    assert float(balancedness(torch.tensor([8.0, 4.0]))) == pytest.approx(0.75)


@pytest.mark.parametrize("args, match", [
    ((README_WEIGHT, 18, 4, 2, 8), "multiple of num_gpus"),
    ((README_WEIGHT, 16, 4, 3, 8), "multiple of num_nodes"),
    ((README_WEIGHT[0], 16, 4, 2, 8), "layers, num_logical"),
    ((README_WEIGHT, 8, 4, 2, 8), "at least"),
    ((README_WEIGHT, 16, 8, 2, 8), "equal groups"),
    ((-README_WEIGHT, 16, 4, 2, 8), "non-negative"),
    ((README_WEIGHT, 16, 4, 0, 8), "positive integer"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        rebalance_experts(*args)
