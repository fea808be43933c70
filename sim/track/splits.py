"""Dataset splits of the procedural tracks: disjoint seed ranges for train, val and test."""

from __future__ import annotations

import operator

TRAIN, VAL, TEST = "train", "val", "test"
#: Half-open ``[start, stop)`` seed ranges of the procedural tracks of each split (disjoint).
SPLIT_SEED_RANGES: dict[str, tuple[int, int]] = {
    TRAIN: (0, 100_000),
    VAL: (100_000, 200_000),
    TEST: (200_000, 300_000),
}



def split_seed(split: str, index: int) -> int:
    """Seed of the ``index``-th procedural track of a dataset split.

    Args:
        split: One of :data:`TRAIN`, :data:`VAL`, :data:`TEST`.
        index: ``0 <= index < size of the split's seed range``.

    Raises:
        ValueError: Unknown split or index out of range.
    """
    if split not in SPLIT_SEED_RANGES:
        raise ValueError(
            f"split_seed: unknown split {split!r}; valid splits are "
            f"{', '.join(repr(k) for k in SPLIT_SEED_RANGES)}"
        )
    try:
        index = operator.index(index)
    except TypeError:
        raise ValueError(f"split_seed: index must be an integer, got {index!r}") from None
    lo, hi = SPLIT_SEED_RANGES[split]
    if not 0 <= index < hi - lo:
        raise ValueError(
            f"split_seed: index must be in [0, {hi - lo}) for split {split!r}, got {index}"
        )
    return lo + index

