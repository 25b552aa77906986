"""Pallas kernels for jaxattn: arrays and static configs in, arrays out (never imports jaxattn).

Subpackages:
  flash: block-sparse flash attention (forward + backward, interpret / GPU / TPU lowerings).
"""
