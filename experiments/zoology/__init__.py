"""Zoology (Arora, Eyuboglu et al., 2023): multi-query associative recall (MQAR)."""
