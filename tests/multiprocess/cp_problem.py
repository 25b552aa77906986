"""The problem the two-process test solves: inputs, the sharded computation and the reference.

Pure functions of a fixed seed, so every process (and the single-process reference) builds the
same global arrays.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxattn
from jaxattn.parallel import context_parallel_attention, make_mesh

B, T, D, N, K, H = 2, 32, 16, 4, 2, 8
STRATEGIES = ("all_gather", "ring", "ulysses")
LR = 0.1


def inputs():
    r = np.random.default_rng(0)
    x = r.normal(size=(B, T, D)).astype(np.float32)
    params = {
        "wq": (r.normal(size=(D, N, H)) / np.sqrt(D)).astype(np.float32),
        "wk": (r.normal(size=(D, K, H)) / np.sqrt(D)).astype(np.float32),
        "wv": (r.normal(size=(D, K, H)) / np.sqrt(D)).astype(np.float32),
        "wo": (r.normal(size=(N, H, D)) / np.sqrt(N * H)).astype(np.float32),
    }
    seg = np.repeat(np.array([[0, 1], [0, 0]]), T // 2, axis=1).astype(np.int32)
    target = r.normal(size=(B, T, D)).astype(np.float32)
    return x, params, seg, target


def model(params, x, seg, attention):
    q = jnp.einsum("btd,dnh->btnh", x, params["wq"])
    k = jnp.einsum("btd,dkh->btkh", x, params["wk"])
    v = jnp.einsum("btd,dkh->btkh", x, params["wv"])
    o = attention(q, k, v, is_causal=True, query_segment_ids=seg)
    return jnp.einsum("btnh,nhd->btd", o, params["wo"])


def loss_fn(params, x, seg, target, attention):
    return jnp.mean((model(params, x, seg, attention) - target) ** 2)


def train_step(params, x, seg, target, attention):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, seg, target, attention)
    new = jax.tree.map(lambda p, g: p - LR * g, params, grads)
    return loss, grads, new


def reference_results():
    x, params, seg, target = inputs()
    ref = lambda q, k, v, **kw: jaxattn.dot_product_attention(
        q, k, v, implementation="reference", **kw)
    out = {}
    # one jitted program instead of op-by-op dispatch (differences ~1e-9, far below the test's
    # 2e-5); the strategies all share this single-device result
    y, (loss, grads, new) = jax.jit(lambda p, x, seg, t: (
        model(p, x, seg, ref), train_step(p, x, seg, t, ref)))(params, x, seg, target)
    for s in STRATEGIES:
        out[f"{s}_y"] = y
        out[f"{s}_loss"] = loss
        for name in params:
            out[f"{s}_grad_{name}"] = grads[name]
            out[f"{s}_new_{name}"] = new[name]
    return {k: np.asarray(v) for k, v in out.items()}


def sharded_results():
    """Global results of every strategy on a data=2 x context=4 mesh (over all processes)."""
    x, params, seg, target = inputs()
    mesh = make_mesh(data=2, context=4)
    put = lambda a, spec: jax.make_array_from_callback(
        a.shape, NamedSharding(mesh, spec), lambda idx: a[idx])
    xs = put(x, P("data", "context", None))
    ts = put(target, P("data", "context", None))
    ss = put(seg, P("data", "context"))
    ps = {k: put(v, P()) for k, v in params.items()}
    out = {}
    for s in STRATEGIES:
        attn = lambda q, k, v, s=s, **kw: context_parallel_attention(
            q, k, v, mesh=mesh, strategy=s, implementation="xla_chunked", **kw)
        # forward and training step in one program: one compilation per strategy
        y, (loss, grads, new) = jax.jit(
            lambda p, x, seg, t, attn=attn: (model(p, x, seg, attn),
                                             train_step(p, x, seg, t, attn)))(ps, xs, ss, ts)
        out[f"{s}_y"] = y
        out[f"{s}_loss"] = loss
        for name in params:
            out[f"{s}_grad_{name}"] = grads[name]
            out[f"{s}_new_{name}"] = new[name]
    # replicate every result so each process can read all of it (one program for all of them)
    return jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))(out)
