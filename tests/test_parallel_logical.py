"""Logical axis rules, mesh construction and activation constraints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxattn.parallel import (
    DEFAULT_RULES,
    MeshConfig,
    axis_rules,
    constrain,
    logical_sharding,
    logical_to_spec,
    make_mesh,
    state_shardings,
)


def test_make_mesh_from_config():
    mesh = make_mesh(MeshConfig(data=2, context=-1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1, "context": 4}
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh(data=2, tensor=3)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, context=-1)


def test_rules_resolution():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    # batch takes data+fsdp, so embed (-> fsdp) stays unsharded on activations
    spec = logical_to_spec(("batch", "length", "embed"), mesh=mesh)
    assert spec == P(("data", "fsdp"), None, None)
    # weights: embed -> fsdp, heads -> tensor (column-parallel q projection)
    assert logical_to_spec(("embed", "heads", "head_dim"), mesh=mesh) == P("fsdp", "tensor", None)
    # output projection: row-parallel
    assert logical_to_spec(("heads", "head_dim", "embed"), mesh=mesh) == P("tensor", None, "fsdp")
    # context axis has size 1 here: length is not sharded
    assert logical_to_spec(("length",), mesh=mesh) == P(None)
    # GQA: 1 kv head cannot be split over tensor=2 -> replicated
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), mesh=mesh,
                           shape=(8, 1, 4)) == P("fsdp", None, None)
    with pytest.raises(ValueError, match="no rule"):
        logical_to_spec(("pixels",), mesh=mesh)
    custom = (("batch", "data"), ("length", ("context", "fsdp")))
    assert logical_to_spec(("batch", "length"), custom, mesh) == P("data", "fsdp")


def test_constrain_is_noop_outside_rules_and_shards_inside():
    x = jnp.ones((8, 16, 4))
    assert constrain(x, ("batch", "length", "embed")) is x
    mesh = make_mesh(data=2, context=4)

    @jax.jit
    def f(x):
        return constrain(x * 2, ("batch", "length", "embed"))

    with axis_rules(mesh, DEFAULT_RULES):
        y = f(x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "context")), 3)
    np.testing.assert_array_equal(y, 2 * np.ones((8, 16, 4)))
    with pytest.raises(ValueError, match="logical names"):
        with axis_rules(mesh):
            constrain(x, ("batch",))
    assert logical_sharding(("batch",), mesh).spec == P("data")


def test_state_shardings_of_nnx_layer():
    from flax import nnx

    from jaxattn.nn import MultiHeadAttention

    mesh = make_mesh(fsdp=2, tensor=4)
    layer = MultiHeadAttention(num_heads=8, in_features=16, num_kv_heads=2,
                               rngs=nnx.Rngs(0))
    state = nnx.state(layer, nnx.Param)
    sh = state_shardings(state, mesh)
    specs = {"/".join(map(str, path)): s.spec for path, s in nnx.to_flat_state(sh)}
    q = [v for k, v in specs.items() if "query" in k and "kernel" in k][0]
    kk = [v for k, v in specs.items() if "key" in k and "kernel" in k][0]
    o = [v for k, v in specs.items() if "out" in k and "kernel" in k][0]
    assert q == P("fsdp", "tensor", None), specs  # column-parallel
    assert kk == P("fsdp", None, None), specs  # 2 kv heads on tensor=4: replicated
    assert o == P("tensor", None, "fsdp"), specs  # row-parallel
    placed = jax.device_put(state, sh)
    assert placed is not None
