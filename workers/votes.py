"""DensePure's majority vote over K purified copies, and when it is already decided.

The base decision of a draw is the most frequent label among its first k votes, ties going to
the label seen first in vote order (the reference implementation's merge). The first k of K
votes form a valid k-vote classifier, so one computation reports several k.

A prefix k is *settled* after the first m < k votes when no labels the remaining k - m votes
could take change its decision: the leader L (with c_L votes) beats every other label l
(c_l votes) even if all k - m remaining votes went to l (c_L > c_l + k - m), or ties it and wins
the tie by having been seen first. Skipping the remaining votes of a settled prefix is exact:
its decision is the one all K votes would give. Pure torch functions of the labels.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["majority_votes", "more_votes_needed", "settled_decisions"]


def _tally(labels: torch.Tensor, upto: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (D, C) and first-seen positions (D, C; K when unseen) of the first ``upto[d]`` votes of each draw."""
    D, K = labels.shape
    position = torch.arange(K, device=labels.device).view(1, K)
    valid = (position < upto.view(D, 1)) & (labels >= 0)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), num_classes).to(torch.int64) * valid.unsqueeze(-1)
    counts = onehot.sum(dim=1)
    first = torch.where(onehot.bool(), position.unsqueeze(-1), torch.full_like(position.unsqueeze(-1), K)).amin(dim=1)
    return counts, first


def _leader(counts: torch.Tensor, first: torch.Tensor, K: int) -> torch.Tensor:
    """Most votes, ties to the label seen first."""
    return (counts * (K + 1) - first).argmax(dim=1)


def majority_votes(labels: torch.Tensor, vote_counts: Sequence[int], num_classes: int) -> torch.Tensor:
    """Base decisions of the k-vote classifiers for each k in ``vote_counts``.

    labels: (B, K) classifier labels of the K votes of each draw, in vote order. Returns
    (len(vote_counts), B): the most frequent label among the first k votes; ties go to the
    label seen first in vote order, as in the reference implementation's merge.
    """
    B, K = labels.shape
    out = []
    for k in vote_counts:
        if not 1 <= k <= K:
            raise ValueError(f"vote count {k} is outside 1..{K}")
        counts, first = _tally(labels, torch.full((B,), k, device=labels.device), num_classes)
        out.append(_leader(counts, first, K))
    return torch.stack(out)


def _margins(labels: torch.Tensor, computed: torch.Tensor, k: int, num_classes: int):
    """For prefix k given the first ``computed[d]`` votes: leader, margin c_L - c_l - r per label,
    tie-break advantage, and r = remaining votes of the prefix."""
    D, K = labels.shape
    upto = computed.clamp(max=k)
    counts, first = _tally(labels, upto, num_classes)
    leader = _leader(counts, first, K)
    c_leader = counts.gather(1, leader.view(D, 1))
    first_leader = first.gather(1, leader.view(D, 1))
    remaining = (k - computed).clamp(min=0).view(D, 1)
    margin = c_leader - counts - remaining
    wins_tie = first_leader < first  # an unseen label (first = K) always loses a tie to a seen leader
    return leader, margin, wins_tie, remaining.view(D)


def settled_decisions(labels: torch.Tensor, computed: torch.Tensor, vote_counts: Sequence[int], num_classes: int) -> torch.Tensor:
    """(len(vote_counts), D): the decision of each prefix k, or -1 while it is not settled.

    ``labels`` (D, K) holds the labels of the first ``computed[d]`` votes of draw d (later entries
    are ignored). Guarantee: a value >= 0 equals ``majority_votes`` of the full K votes for that k,
    whatever the labels of the votes not yet computed.
    """
    D = labels.shape[0]
    out = []
    for k in vote_counts:
        leader, margin, wins_tie, _ = _margins(labels, computed, k, num_classes)
        ok = (margin > 0) | ((margin == 0) & wins_tie)
        ok.scatter_(1, leader.view(D, 1), True)
        settled = ok.all(dim=1) & (computed > 0)
        out.append(torch.where(settled, leader, torch.full_like(leader, -1)))
    return torch.stack(out)


def more_votes_needed(labels: torch.Tensor, computed: torch.Tensor, vote_counts: Sequence[int], num_classes: int) -> torch.Tensor:
    """(D,): the fewest further votes after which every prefix could be settled (if they all went
    to the current leader); 0 for draws whose prefixes are all settled. A planning bound only:
    votes that disagree make the next look ask again."""
    D, K = labels.shape
    need = torch.zeros(D, dtype=torch.int64, device=labels.device)
    for k in vote_counts:
        leader, margin, wins_tie, remaining = _margins(labels, computed, k, num_classes)
        # Each vote to the leader raises every margin by 2 (one more for L, one fewer remaining).
        strict = torch.div(-margin, 2, rounding_mode="floor") + 1
        tie_ok = torch.div(-margin + 1, 2, rounding_mode="floor")
        a = torch.where(wins_tie, tie_ok, strict).clamp(min=0)
        a.scatter_(1, leader.view(D, 1), 0)
        a = torch.minimum(a.amax(dim=1), remaining)
        need = torch.maximum(need, torch.where(computed > 0, a, remaining))
    return need
