"""The reference backend (``implementation="reference"``) through the conformance suite: the
dispatcher's plumbing (is_causal, segment ids, bias reshapes, rank 3) against the dense spec."""

from conformance.attention import AttentionConformance


class TestReference(AttentionConformance):
    implementation = "reference"
