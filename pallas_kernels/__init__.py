"""Pallas kernels for jaxattn: arrays and static configs in, arrays out (never imports jaxattn).

Subpackages:
  flash: block-sparse flash attention (forward + backward, interpret / GPU / TPU lowerings).
  neighborhood: fused neighborhood attention (block-sparse, per-query window boxes; fwd + bwd).
"""
