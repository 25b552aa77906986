"""Tensor attention (Alman & Song 2023): Match3 and the polynomial method."""
