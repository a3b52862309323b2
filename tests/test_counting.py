"""moe/counting.py on 3 real ranks: every key's count summed over ranks ends on exactly the rank its
hash names, each rank holding only its share; rank 0 gathers them all; partial sums add up. The
reference: the same counts added up in this process."""
from collections import Counter

import torch

from conftest import launch_module

from megatron_sdmoe.moe.counting import mixed


def test_counts_are_summed_on_the_rank_that_owns_each_key(tmp_path):
    launch_module("workers.counting", [str(tmp_path)], 3)
    ranks = [torch.load(tmp_path / f"counts_{rank}.pt", weights_only=False) for rank in range(3)]
    everything = Counter()
    for rank in ranks:
        for keys, counts in rank["parts"]:
            everything.update({tuple(k): n for k, n in zip(keys.tolist(), counts.tolist())})
    assert sum(everything.values()) == 3 * (50 + 30)  # as drawn
    owned = [{tuple(k): n for k, n in zip(rank["owned"][0].tolist(), rank["owned"][1].tolist())} for rank in ranks]
    for index, share in enumerate(owned):
        assert share and len(share) < len(everything)  # a share, not everything
        assert all(int(mixed(torch.tensor([key]))[0] % 3) == index for key in share)
    assert sum((Counter(share) for share in owned), Counter()) == everything  # disjoint, and nothing lost
    [(keys, counts)] = ranks[0]["first"]
    assert dict(zip(map(tuple, keys.tolist()), counts.tolist())) == everything
    assert ranks[1]["first"] is None and ranks[2]["first"] is None
    assert all(rank["summed"] == [[3.0, 3.0], [1.5, 6.0]] for rank in ranks)
