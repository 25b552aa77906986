"""cuDNN through jax.nn (GPU only) through the conformance suite: skipped on other platforms.

What jax.nn's cuDNN path refuses (see ``_cudnn_supports`` in jaxattn's dispatcher) is declared
unsupported, so on a GPU only the bf16 causal / sliding-window cases run.
"""

from conformance.attention import AttentionConformance


class TestCudnn(AttentionConformance):
    implementation = "cudnn"
    platform = "gpu"
    unsupported = frozenset({"float32", "lse", "soft_cap", "sinks", "segments", "dropout",
                             "traced_mask", "general_masks"})
