"""Early majority: a prefix k is settled only when no completion of its votes changes its decision."""

from __future__ import annotations

import itertools

import torch

from workers.votes import majority_votes, more_votes_needed, settled_decisions

C = 3


def test_settled_prefixes_are_exactly_the_decided_ones_for_all_label_sequences_up_to_6_votes():
    for K in range(1, 7):
        sequences = torch.tensor(list(itertools.product(range(C), repeat=K)))
        vote_counts = list(range(1, K + 1))
        full = majority_votes(sequences, vote_counts, C)
        for m in range(1, K + 1):
            seen = sequences.clone()
            seen[:, m:] = -1
            decided = settled_decisions(seen, torch.full((len(seen),), m), vote_counts, C)
            # Which decisions each first-m prefix can still lead to, over all its completions.
            reachable: dict[tuple, set] = {}
            for seq, dec in zip(sequences.tolist(), full.T.tolist()):
                for v, d in enumerate(dec):
                    reachable.setdefault((tuple(seq[:m]), v), set()).add(d)
            for row, seq in enumerate(sequences.tolist()):
                for v in range(K):
                    outcomes = reachable[(tuple(seq[:m]), v)]
                    if decided[v, row] >= 0:
                        assert outcomes == {int(decided[v, row])}, (K, m, seq, v)
                    else:  # not settled: some completion really decides otherwise
                        assert len(outcomes) > 1, (K, m, seq, v)


def test_more_votes_needed_is_a_lower_bound_reached_when_votes_agree():
    labels = torch.tensor([[0, 0, 1, -1, -1, -1], [2, 2, 2, -1, -1, -1], [0, 1, 2, -1, -1, -1]])
    computed = torch.tensor([3, 3, 3])
    need = more_votes_needed(labels, computed, [1, 6], C)
    # 3 of 3 agree: already settled for K = 6 (another label can at best tie at 3 and the tie goes
    # to the label seen first); 0, 0, 1 needs more.
    assert need[1] == 0 and need[0] >= 1 and need[2] >= 1
    for d in range(3):
        extended = labels.clone()
        leader = int(majority_votes(labels[d : d + 1, :3], [3], C)[0, 0])
        extended[d, 3 : 3 + need[d]] = leader
        settled = settled_decisions(extended[d : d + 1], computed[d : d + 1] + need[d], [1, 6], C)
        assert (settled >= 0).all(), d
        if need[d] > 1:
            fewer = settled_decisions(extended[d : d + 1], computed[d : d + 1] + need[d] - 1, [1, 6], C)
            assert (fewer < 0).any(), d
