"""tools.bench.order: the randomness measures of the loader's orders say what they should on orders whose
answer is known."""

import numpy as np

from tools.bench.order import class_sorted_labels, markdown, measure, randomness


def test_measures_of_known_orders():
    n, block, batch = 4096, 16, 64
    labels = class_sorted_labels(n, 16)
    assert labels[0] == 0 and labels[-1] == 15 and np.all(np.diff(labels) >= 0)
    in_place = randomness(np.arange(n), labels, block=block, batch=batch)  # row order: chunks read together
    assert in_place["batches_per_chunk"] == 1 and in_place["chunks_per_batch"] == batch // block
    assert in_place["same_chunk_pairs_per_batch"] == batch // block * block * (block - 1) // 2
    assert in_place["neighbour_gap"] == 1 / n
    table = measure(rows=n, classes=16, block=block, batch=batch, windows=(batch, 1024), seed=1)
    perm, whole, wide = table
    assert perm["order"] == "permutation" and perm["batches_per_chunk"] > 14 and perm["neighbour_gap"] > 0.2
    assert whole["batches_per_chunk"] == 1  # a window of one batch: each chunk in one batch
    assert wide["chunks_per_batch"] > whole["chunks_per_batch"] and wide["neighbour_gap"] < perm["neighbour_gap"]
    assert "| permutation |" in markdown(table)
