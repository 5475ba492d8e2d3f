"""Balanced clustering of FFN neurons into equal-size experts (MoEfication-style).

``balanced_kmeans(features, clusters)`` splits the rows of ``features`` (one row per neuron: its weight
vector, or its activations over calibration tokens) into clusters of exactly ``rows / clusters`` members
by spherical k-means: similarity is the cosine, each iteration assigns neurons greedily in order of
decreasing similarity to a centroid that still has room, and the final assignment is made optimal for
the last centroids by a linear assignment (scipy's Hungarian solver over the slots of every cluster).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

SEED = 0


def balanced_kmeans(features: torch.Tensor, clusters: int, iterations: int = 12, seed: int = SEED) -> torch.Tensor:
    """[R] i64 cluster id of each row of ``features`` [R, D]; every cluster gets R / clusters rows."""
    rows = features.shape[0]
    if rows % clusters:
        raise ValueError(f"{rows} rows do not split into {clusters} equal clusters")
    size = rows // clusters
    unit = torch.nn.functional.normalize(features.float(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    centroids = unit[torch.randperm(rows, generator=generator)[:clusters]]
    assignment = torch.zeros(rows, dtype=torch.int64)
    for _ in range(iterations):
        new = _greedy_assign(unit @ centroids.T, size)
        if torch.equal(new, assignment):
            break
        assignment = new
        centroids = _centroids(unit, assignment, clusters)
    return _optimal_assign(unit @ centroids.T, size)


def _centroids(unit: torch.Tensor, assignment: torch.Tensor, clusters: int) -> torch.Tensor:
    sums = torch.zeros(clusters, unit.shape[1]).index_add_(0, assignment, unit)
    return torch.nn.functional.normalize(sums, dim=1)


def _greedy_assign(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """Take (row, cluster) pairs from the most similar down; a pair is used if the row is free and the
    cluster not full."""
    rows, clusters = similarity.shape
    order = torch.argsort(similarity.reshape(-1), descending=True).tolist()
    assignment = [-1] * rows
    room = [size] * clusters
    left = rows
    for pair in order:
        row, cluster = divmod(pair, clusters)
        if assignment[row] < 0 and room[cluster]:
            assignment[row] = cluster
            room[cluster] -= 1
            left -= 1
            if not left:
                break
    return torch.tensor(assignment, dtype=torch.int64)


def _optimal_assign(similarity: torch.Tensor, size: int) -> torch.Tensor:
    """The assignment maximizing total similarity with every cluster holding ``size`` rows."""
    slots = np.repeat(similarity.double().numpy(), size, axis=1)  # [R, clusters * size]
    rows, columns = linear_sum_assignment(slots, maximize=True)
    assignment = np.empty(similarity.shape[0], dtype=np.int64)
    assignment[rows] = columns // size
    return torch.from_numpy(assignment)
