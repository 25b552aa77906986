"""Routing Transformer (Roy et al., 2021): long-distance associative recall."""
