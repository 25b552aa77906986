"""Every registered token mixer passes the mixer conformance suite; the registry refuses what
it cannot build."""

import pytest
from flax import nnx

from jaxattn.nn import MIXERS, make_mixer, register_mixer
from tests.conformance.mixers import (
    CrossMixerConformance,
    MixerConformance,
    case_id,
    cases,
    cross_cases,
)


@pytest.mark.parametrize("case", cases(), ids=case_id)
class TestMixers(MixerConformance):
    pass


@pytest.mark.parametrize("case", cross_cases(), ids=case_id)
class TestCrossMixers(CrossMixerConformance):
    pass


def test_every_mixer_is_covered_and_documented():
    assert {name for name, _ in cases()} == set(MIXERS)
    for spec in MIXERS.values():
        assert spec.paper and spec.patterns


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        make_mixer("nope", features=8, num_heads=1, causal=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not support the 'self' pattern"):
        make_mixer("baseconv", features=8, num_heads=1, causal=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already registered"):
        register_mixer("attention", lambda **kw: None, patterns={"self"}, paper="x")
    with pytest.raises(ValueError, match="subset"):
        register_mixer("bad_pattern", lambda **kw: None, patterns={"diagonal"}, paper="x")
    with pytest.raises(ValueError, match="takes no mask"):
        m = make_mixer("baseconv", features=8, num_heads=1, causal=True, rngs=nnx.Rngs(0))
        import jax.numpy as jnp

        m(jnp.zeros((1, 4, 8)), mask=jnp.ones((4, 4), bool))
