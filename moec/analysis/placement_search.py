"""Local search that improves an expert placement on the full routing trace.

Two neighbourhoods, both exchanges, so every rank keeps its expert count in every layer (capacity and
memory limits keep holding) and both checked against each layer's per-rank load limit:

* **expert swaps**: two experts of one layer, on different ranks, trade places;
* **group swaps**: two groups of experts that heavy transitions tie together across layers (for
  example the chain of experts a token population follows through the model), each held whole by one
  rank and with the same number of experts in every layer, trade ranks. One expert swap cannot move
  such a chain without breaking its heavy edges, so how the chains share ranks is out of its reach.

Moves are taken best first until none keeps at least one more unit of transition mass local (masses
are integers). The placement is ``owners[layer, expert] = rank``; transitions are integer masses
``[layers - 1, E, E]`` and loads ``[layers, E]``.
"""

from __future__ import annotations

import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def affinity_groups(edges: list[list[list[tuple[int, int]]]], num_layers: int, num_experts: int) -> torch.Tensor:
    """``membership[group, layer, expert]`` (bool): the connected components, of two or more experts,
    of the graph whose edges are ``edges[l][b]`` = [(expert a of layer l, mass), ...] into expert b of l+1."""
    E = num_experts
    pairs = [(layer * E + a, (layer + 1) * E + b) for layer, per_expert in enumerate(edges)
             for b, predecessors in enumerate(per_expert) for a, _ in predecessors]
    nodes = num_layers * E
    if not pairs:
        return torch.zeros(0, num_layers, E, dtype=torch.bool)
    rows, cols = zip(*pairs, strict=True)
    _, labels = connected_components(coo_matrix(([1] * len(pairs), (rows, cols)), shape=(nodes, nodes)), directed=False)
    labels = torch.from_numpy(labels).long()
    sizes = torch.bincount(labels)
    kept = (sizes >= 2).nonzero().squeeze(1)
    return (labels.unsqueeze(0) == kept.unsqueeze(1)).reshape(len(kept), num_layers, E)


def improve(owners: torch.Tensor, transitions: torch.Tensor, load: torch.Tensor, limit: torch.Tensor,
            world_size: int, groups: torch.Tensor) -> torch.Tensor:
    """A placement at least as good as ``owners`` (a new tensor) that neither neighbourhood improves."""
    owners = owners.clone()
    masses, load, limit = transitions.double(), load.double(), limit.double()
    while True:
        _swap_experts(owners, masses, load, limit, world_size)
        if not _swap_groups(owners, masses, load, limit, world_size, groups):
            return owners  # expert swaps had already run out, so neither neighbourhood improves


def _neighbour_mass(owners: torch.Tensor, masses: torch.Tensor, layer: int, world_size: int) -> torch.Tensor:
    """``[E, R]``: the transition mass between each expert of ``layer`` and the neighbouring layers'
    experts on each rank (what stays local if the expert sits there)."""
    L = owners.shape[0]
    value = torch.zeros(owners.shape[1], world_size, dtype=torch.float64)
    if layer > 0:
        value += masses[layer - 1].T @ torch.nn.functional.one_hot(owners[layer - 1], world_size).double()
    if layer < L - 1:
        value += masses[layer] @ torch.nn.functional.one_hot(owners[layer + 1], world_size).double()
    return value


def _all_neighbour_mass(one_hot: torch.Tensor, masses: torch.Tensor) -> torch.Tensor:
    """``[L, E, R]``: ``_neighbour_mass`` of every layer at once, from the placement's one-hot ``[L, E, R]``."""
    value = torch.zeros_like(one_hot)
    value[1:] += torch.bmm(masses.transpose(1, 2), one_hot[:-1])
    value[:-1] += torch.bmm(masses, one_hot[1:])
    return value


def _swap_experts(owners, masses, load, limit, world_size) -> bool:
    changed, sweep_changed = False, True
    while sweep_changed:
        sweep_changed = False
        for layer in range(owners.shape[0]):
            # An expert's value depends only on the neighbouring layers, so it stays valid while this layer changes.
            value = _neighbour_mass(owners, masses, layer, world_size)
            weight = load[layer]
            while True:
                own = owners[layer]
                current = value.gather(1, own.unsqueeze(1)).squeeze(1)
                exchanged = value[:, own]  # exchanged[a, b]: a's value on b's rank
                gain = exchanged + exchanged.T - current.unsqueeze(1) - current.unsqueeze(0)
                rank_load = torch.zeros(world_size, dtype=torch.float64).index_add_(0, own, weight)
                after = rank_load[own].unsqueeze(1) - weight.unsqueeze(1) + weight.unsqueeze(0)  # a's rank once b replaces a
                allowed = (own.unsqueeze(1) != own.unsqueeze(0)) & (after <= limit[layer]) & (after.T <= limit[layer])
                gain = torch.where(allowed, gain, torch.zeros_like(gain))
                best = int(gain.argmax())
                if float(gain.view(-1)[best]) < 0.5:
                    break
                a, b = divmod(best, owners.shape[1])
                owners[layer, a], owners[layer, b] = int(own[b]), int(own[a])
                changed = sweep_changed = True
    return changed


def _swap_groups(owners, masses, load, limit, world_size, groups) -> bool:
    if len(groups) < 2:
        return False
    member = groups.double()  # [G, L, E]
    profile = groups.sum(2)  # experts per layer [G, L]
    same_shape = (profile.unsqueeze(1) == profile.unsqueeze(0)).all(2)
    group_load = torch.einsum("gle,le->gl", member, load)
    forward = torch.einsum("gla,lab,hlb->gh", member[:, :-1], masses, member[:, 1:])
    between = forward + forward.T  # transition mass between groups g and h, both directions
    changed = False
    while True:
        one_hot = torch.nn.functional.one_hot(owners, world_size).double()  # [L, E, R]
        held = torch.einsum("gle,ler->gr", member, one_hot)
        whole = held.max(1).values == profile.sum(1)  # the group sits on one rank
        rank = held.argmax(1)
        value = torch.einsum("gle,ler->gr", member, _all_neighbour_mass(one_hot, masses))  # [G, R]
        value[torch.arange(len(groups)), rank] -= between.diagonal()  # internal edges stay local anyway
        current = value.gather(1, rank.unsqueeze(1)).squeeze(1)
        exchanged = value[:, rank]
        gain = exchanged + exchanged.T - current.unsqueeze(1) - current.unsqueeze(0) - 2 * between
        rank_load = torch.einsum("ler,le->rl", one_hot, load)  # [R, L]
        after = rank_load[rank].unsqueeze(1) - group_load.unsqueeze(1) + group_load.unsqueeze(0)  # g's rank, g -> h
        fits = (after <= limit).all(2)
        allowed = same_shape & fits & fits.T & whole.unsqueeze(1) & whole.unsqueeze(0) & (rank.unsqueeze(1) != rank.unsqueeze(0))
        gain = torch.where(allowed, gain, torch.zeros_like(gain))
        best = int(gain.argmax())
        if float(gain.view(-1)[best]) < 0.5:
            return changed
        g, h = divmod(best, len(groups))
        owners[groups[g]] = int(rank[h])
        owners[groups[h]] = int(rank[g])
        changed = True
