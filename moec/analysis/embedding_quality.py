"""Quality of a compiled sentence-embedding model against the original: mean-pooled embedding cosine.

``SENTENCES`` are a small, varied English sample: ``calibration_sentences()`` for passes that calibrate,
``held_out_sentences()`` (disjoint) for measuring what those passes cost.
"""

from __future__ import annotations

import torch

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Interest rates rose again after the central bank meeting.",
    "She trained for months before running her first marathon.",
    "Photosynthesis converts light energy into chemical energy.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our flight was delayed by three hours because of fog.",
    "He fixed the bug by checking the array bounds first.",
    "The museum opens a new exhibition on ancient Egypt next week.",
    "Volcanic eruptions can cool the planet for several years.",
    "Please send me the quarterly report before Friday.",
    "The orchestra tuned their instruments before the concert.",
    "A strong password mixes letters, numbers and symbols.",
    "Children learn languages faster than most adults do.",
    "The river flooded the valley after a week of heavy rain.",
    "Electric cars are becoming cheaper to buy and to run.",
    "The detective found a hidden letter inside the old book.",
    "Regular exercise improves both mood and sleep quality.",
    "The startup raised its first round of funding in March.",
    "Glaciers in the Alps have shrunk dramatically this century.",
    "He ordered a coffee and sat down to read the newspaper.",
    "Neural networks learn representations from large datasets.",
    "The bridge was closed for repairs during the summer.",
    "Tomatoes grow best in full sun with regular watering.",
    "The committee postponed its decision until next month.",
    "A mixture of experts routes each token to a few specialists.",
    "The painter mixed blue and yellow to make a soft green.",
    "Heavy traffic made the short drive take almost an hour.",
    "Astronomers discovered a planet orbiting a distant star.",
    "The library extended its opening hours for exam season.",
    "Quantum computers use qubits instead of classical bits.",
    "She apologized for the misunderstanding at the meeting.",
    "The bakery on the corner sells fresh bread every morning.",
]
CALIBRATION_COUNT = 16


def calibration_sentences() -> list[str]:
    return SENTENCES[:CALIBRATION_COUNT]


def held_out_sentences() -> list[str]:
    return SENTENCES[CALIBRATION_COUNT:]


def mean_pooled(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings [B, H] from token states [B, S, H]: the mean over real tokens, L2-normalized."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def embedding_cosine(reference: torch.Tensor, candidate: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Mean cosine similarity between the pooled embeddings of two [B, S, H] token-state tensors."""
    return float((mean_pooled(reference, attention_mask) * mean_pooled(candidate, attention_mask)).sum(-1).mean())
