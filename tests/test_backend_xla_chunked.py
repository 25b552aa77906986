"""The chunked XLA backend through the conformance suite, with tiny tiles so that every case
crosses many tiles and pads both lengths (T=37, S=53 on 16 x 16 tiles)."""

from conformance.attention import AttentionConformance


class TestXlaChunked(AttentionConformance):
    implementation = "xla_chunked"
    block_q = block_kv = 16
