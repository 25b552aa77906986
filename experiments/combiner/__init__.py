"""Combiner (Ren et al., NeurIPS 2021): position retrieval, cost vs length, q(j|i) pictures."""
