"""Hopper (H100 / H200) validation of jaxattn's GPU kernels in one command (issue 18).

    bash benchmarks/gpu_check.sh [OUT_DIR]                  # on one H100/H200: under 8 minutes
    python benchmarks/gpu_check.py --out OUT_DIR            # the same
    python benchmarks/gpu_check.py --dry-run --out /tmp/x   # CPU: tiny shapes, interpret mode

Parts, in order. Each runs inside its own try/except with its own time budget (it starts no new
check once the budget is spent); on a GPU each runs in a child process, killed 20 s after its
budget, so a hung or crashing kernel costs only its own part and the entries it finished stay.

* ``environment``: versions, device kind, the tensor-core peak used below, the current value of
  ``HARDWARE_VALIDATED``.
* ``numerics``: ``implementation="pallas"`` (Mosaic-GPU forward where it applies, Triton forward
  otherwise, Triton backward), ``"cudnn"`` and ``"xla_chunked"`` against
  ``implementation="reference"`` in f32, for causal, document-masked (``query_segment_ids``) and
  sliding-window (``LocalMask((w, 0))``) calls, forward and gradients, in bf16 and f16; and the
  Pallas neighborhood kernel on 2-D windows. Budget: twice the error of a 16-bit evaluation of
  the reference (the idea of ``tests/attention_testing.py::bf16_budget``, computed here for the
  output and for each gradient) plus half an ulp at the result's scale. Which kernel really ran
  is read from the lowered HLO (its custom calls), not inferred.
* ``timing_attention``: dense causal forward at L=8192, head dim 128, bf16: TFLOP/s of pallas
  against cuDNN through ``jax.nn.dot_product_attention(implementation="cudnn")``, in the same run;
  document-masked forward+backward: percent of tensor-core peak over the tiles computed (from
  ``mask.block_info``).
* ``timing_neighborhood``: 2-D neighborhood attention at NATTEN's FLUX-4K workload against the
  10.6 ms NATTEN reports (H100, fp16, forward, kernel + token permutation).
* ``pytest``: the GPU-relevant test files on the device (``JAX_PLATFORMS=cuda,cpu``) in pytest
  subprocesses with timeouts; pass/fail counts per file.

Writes ``OUT/summary.json`` and ``OUT/summary.md`` (plus logs) and proposes, per kernel and
dtype, the value a validation flag should take. ``--dry-run`` runs everything but the timing on
CPU in about 20 s (Pallas interpret mode, tiny shapes, pallas-interpret on the document-masked
case only): the timing parts run their code at tiny shapes with XLA stand-ins and report
``skipped`` with the reason, and pytest only collects the selected tests.

This is a driver: it imports both jaxattn and pallas_kernels; nothing imports it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

PARTS = ("environment", "numerics", "timing_attention", "timing_neighborhood", "pytest")
# Seconds per part on a GPU (a child stops starting work at its budget and is killed 20 s
# later); 450 in all, so a run ends within ~470 s (under 8 minutes) even when a part overruns.
GPU_BUDGETS = dict(environment=40, numerics=125, timing_attention=65, timing_neighborhood=50,
                   pytest=170)
# The dry run cannot hang a device; its budgets only have to survive a heavily loaded CPU.
DRY_BUDGETS = dict(environment=60, numerics=300, timing_attention=120, timing_neighborhood=60,
                   pytest=90)
TOTAL_BUDGET_S = 450  # GPU run; the dry run's default is the sum of its part budgets

# Dense (no sparsity) bf16/f16 tensor-core peak, TFLOP/s, by a substring of device_kind; first
# match wins, so the PCIe / NVL variants come before the plain "H100".
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, "H100 PCIe: 756 TFLOP/s dense bf16 (NVIDIA datasheet, 1513 sparse)"),
    ("H100 NVL", 835.0, "H100 NVL: 835 TFLOP/s dense bf16 (NVIDIA datasheet, 1671 sparse)"),
    ("H100", 989.0, "H100 SXM: 989 TFLOP/s dense bf16 (NVIDIA datasheet, 1979 sparse)"),
    ("H800", 989.0, "H800 SXM: same tensor cores as H100 SXM, 989 TFLOP/s dense bf16"),
    ("GH200", 989.0, "GH200: its GPU is an H100 SXM-class GH100, 989 TFLOP/s dense bf16"),
    ("H200", 989.0, "H200: same GH100 silicon and clocks as H100 SXM, so the same 989 TFLOP/s "
                    "dense bf16; only the memory differs (141 GB HBM3e, 4.8 TB/s)"),
)
NATTEN_FLUX_MS = 10.6  # H100, fp16, fwd, kernel + token permutation (NATTEN docs/profiler.md)

# Which test file validates which kernel (for the flag proposals).
PYTEST_FILES = (
    # (file, the tests to run on the GPU (None: all), cap in seconds, why the selection)
    ("tests/test_pallas_flash_mosaic_gpu.py", ("test_runs_on_hopper", "test_lowers_for_cuda"), 40,
     "the Mosaic-GPU interpreter tests pin CPU (~20 s each) and already pass on CPU; only the "
     "on-device and lowering tests are run"),
    ("tests/test_neighborhood_pallas.py", None, 50, ""),
    ("tests/test_pallas_flash.py", None, 120, ""),
)


def pytest_targets(test_file: str, tests) -> list[str]:
    """Command-line targets: node ids of the selected tests (pytest fails on a missing one, so
    a renamed test cannot silently drop out), or the whole file."""
    return [f"{test_file}::{t}" for t in tests] if tests else [test_file]


KERNEL_TEST_FILE = {"mosaic_gpu": "tests/test_pallas_flash_mosaic_gpu.py",
                    "pallas": "tests/test_pallas_flash.py",
                    "na_pallas": "tests/test_neighborhood_pallas.py"}


# ---- sizes ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes of every part: the GPU run and the CPU dry run differ only here."""

    attn: tuple[int, int, int, int, int]  # numerics: B, T=S, N, K, H
    window: int  # sliding-window size of the numerics case
    na_spatial: tuple[int, ...]  # numerics: neighborhood grid
    na_cases: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # (kernel, stride) pairs
    na_heads: tuple[int, int, int]  # N, K, H
    pallas_cases: tuple[str, ...] | None  # attention cases pallas is checked on (None: all)
    dense: tuple[int, int, int, int]  # timing: B, T, N, H
    docs: tuple[int, int, int, int, int]  # timing: B, T, N, H, documents per row
    flux: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int, int]  # spatial, k, s, N, H
    warmup: int
    reps: int
    timed: tuple[str, str]  # implementation timed: attention, neighborhood


GPU_SIZES = Sizes(attn=(2, 1024, 4, 2, 128), window=256, na_spatial=(32, 32),
                  na_cases=(((7, 7), (1, 1)), ((8, 8), (4, 4))), na_heads=(4, 2, 128),
                  pallas_cases=None, dense=(2, 8192, 16, 128), docs=(2, 8192, 16, 128, 12),
                  flux=((256, 256), (80, 80), (16, 16), 24, 128), warmup=2, reps=10,
                  timed=("pallas", "pallas"))
DRY_SIZES = Sizes(attn=(2, 128, 2, 1, 64), window=32, na_spatial=(16, 16),
                  na_cases=(((8, 8), (4, 4)),), na_heads=(2, 1, 32),
                  pallas_cases=("document",), dense=(1, 128, 2, 64), docs=(1, 128, 2, 64, 3),
                  flux=((16, 16), (8, 8), (4, 4), 2, 32), warmup=0, reps=1,
                  # the dry run times XLA stand-ins: the timing code runs, without the ~15 s of
                  # CPU compile the interpreted kernels would cost (numerics checks those)
                  timed=("xla_chunked", "xla"))


@dataclasses.dataclass
class Context:
    dry_run: bool
    out: Path
    sizes: Sizes
    dtypes: tuple[str, ...]
    deadline: float  # time.monotonic() at which the current part must stop starting work
    # XLA options of every compilation; the dry run uses backend optimisation level 0, which
    # cuts the CPU compile of the interpreted kernels by ~35% (it is never used on a GPU)
    compiler_options: dict | None = None

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def jit(self, fn):
        jax, _ = _jax()
        return jax.jit(fn, compiler_options=self.compiler_options)


# ---- recording -----------------------------------------------------------------------------


def error_record(exc: BaseException) -> dict:
    """type, message and the last lines of the traceback of ``exc`` (JSON-ready)."""
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    lines = "".join(tb).rstrip().splitlines()
    return dict(type=type(exc).__name__, message=str(exc)[:2000], traceback=lines[-16:])


class PartLog:
    """The entries of one part; rewritten to ``path`` after every entry, so a part killed at
    its budget still reports what it finished."""

    def __init__(self, name: str, path: Path | None):
        self.record = dict(part=name, status="running", entries=[])
        self.path = path

    def add(self, entry: dict) -> dict:
        self.record["entries"].append(entry)
        self.flush()
        return entry

    def flush(self):
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.record, indent=1, default=str))
            tmp.replace(self.path)


def guarded(log: PartLog, base: dict, fn):
    """Run ``fn() -> dict`` and add ``base | result`` to ``log``; an exception becomes an entry
    with ``status="error"`` instead of ending the part."""
    t0 = time.perf_counter()
    try:
        entry = {**base, **fn()}
    except Exception as e:  # noqa: BLE001 - recorded, the part goes on
        entry = {**base, "status": "error", "error": error_record(e)}
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    return log.add(entry)


def out_of_time(ctx: Context, log: PartLog, base: dict, need_s: float) -> bool:
    """True (and a skipped entry) when less than ``need_s`` of the part's budget is left."""
    if ctx.time_left() >= need_s:
        return False
    log.add({**base, "status": "skipped",
             "reason": f"part budget exhausted ({ctx.time_left():.0f} s left, ~{need_s:.0f} s "
                       "needed)"})
    return True


# ---- shared JAX helpers (imported lazily: the parent process never touches the GPU) -----------


def _jax():
    import jax
    import jax.numpy as jnp

    return jax, jnp


def pallas_backend_module():
    """The module that registers ``implementation="pallas"`` (it is being moved), or None."""
    import importlib

    for name in ("jaxattn.ops.backends.pallas", "jaxattn.ops.pallas_backend"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def max_err(a, b) -> float:
    _, jnp = _jax()
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def max_abs(a) -> float:
    _, jnp = _jax()
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32))))


_TARGET = re.compile(r'custom_call @([\w$.\-]+)|call_target_name = "([^"]+)"')


def kernel_labels(hlo_text: str) -> collections.Counter:
    """Custom calls of lowered HLO by kind: mosaic_gpu, triton, cudnn (others ignored)."""
    found = collections.Counter()
    for a, b in _TARGET.findall(hlo_text):
        target = (a or b).lower()
        for kind in ("mosaic_gpu", "triton", "cudnn"):
            if kind in target:
                found[kind] += 1
    return found


def _label(counter: collections.Counter, impl: str) -> str:
    if counter:
        return "+".join(sorted(counter))
    return "interpret" if impl.endswith("pallas") else "xla"


def lowered_kernels(fwd, both, args, impl: str):
    """Compile ``both`` (forward + gradients) once and read from the lowered HLO which kernels
    the forward (``fwd``, lowered only) and the backward ran. Returns ``(compiled, kernels)``."""
    lowered = both.lower(*args)
    kernels = dict(fwd="unknown", bwd="unknown")
    try:
        f = kernel_labels(fwd.lower(*args[:3]).as_text())
        kernels = dict(fwd=_label(f, impl),
                       bwd=_label(kernel_labels(lowered.as_text()) - f, impl))
    except Exception as e:  # noqa: BLE001 - the numerics still run
        kernels["error"] = error_record(e)
    return lowered.compile(), kernels


def first_attr(*candidates):
    """The first ``module:attribute`` that imports (jaxattn internals are being moved), else
    raise ImportError naming all of them."""
    import importlib

    for cand in candidates:
        mod, _, attr = cand.partition(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {candidates} is importable")


def random_inputs(seed: int, shapes, dtype):
    jax, jnp = _jax()
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in
            zip(keys, shapes, strict=True)]


def low_precision_reference(q, k, v, mask, w, dtype):
    """Output and ``(dq, dk, dv)`` for the output cotangent ``w``, computed the way a flash
    kernel does in ``dtype``: f32 logits and softmax, every matmul operand (P, dO, dS) rounded
    to ``dtype`` with f32 accumulation, results rounded to ``dtype``.

    Shapes: ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, Hv]``, ``w [B, T, N, Hv]``;
    ``mask`` a jaxattn Mask. This is the "16-bit evaluation of the reference" whose error,
    doubled, is the budget of every 16-bit implementation.
    """
    _, jnp = _jax()
    from jaxattn.core import dense

    f32 = jnp.float32
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    scale = h**-0.5
    lo = lambda x: x.astype(dtype)
    ein = lambda spec, x, y: jnp.einsum(spec, x, y, preferred_element_type=f32)
    p, _ = dense.attention_probabilities(q, k, None, mask, scale=scale)  # f32 [B, N, T, S]
    p = p.reshape(b, kh, g, t, -1)
    out = lo(ein("bkgts,bskh->btkgh", lo(p), v))  # [B, T, K, G, Hv]
    do = lo(w).reshape(out.shape)
    dv = ein("bkgts,btkgh->bskh", lo(p), do)
    dp = ein("btkgh,bskh->bkgts", do, v)
    delta = jnp.sum(do.astype(f32) * out.astype(f32), axis=-1)  # [B, T, K, G]
    ds = p * (dp - jnp.transpose(delta, (0, 2, 3, 1))[..., None])
    dq = ein("bkgts,bskh->btkgh", lo(ds), k).reshape(b, t, n, h) * scale
    dk = ein("bkgts,btkgh->bskh", lo(ds), q.reshape(b, t, kh, g, h)) * scale
    return out.reshape(b, t, n, -1), (lo(dq), lo(dk), lo(dv))


def out_and_grads(fn):
    """``fn(q, k, v) -> out`` to ``(q, k, v, w) -> (out, (dq, dk, dv))`` for the output
    cotangent ``w`` (the gradient of ``sum(out * w)``): forward and backward in one program."""
    jax, _ = _jax()

    def both(q, k, v, w):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(w.astype(out.dtype))

    return both


@dataclasses.dataclass(frozen=True)
class Budget:
    """Per-result error budgets: 2 x the 16-bit reference's error + half an ulp at its scale."""

    out: float
    grads: tuple[float, float, float]
    ref_err: dict


def budgets(truth_out, truth_grads, low_out, low_grads, dtype) -> Budget:
    jnp = _jax()[1]
    half_ulp = float(jnp.finfo(dtype).eps) / 2
    ref_err = dict(out=max_err(low_out, truth_out))
    grads = []
    for name, lg, tg in zip(("dq", "dk", "dv"), low_grads, truth_grads, strict=True):
        ref_err[name] = max_err(lg, tg)
        grads.append(2 * ref_err[name] + half_ulp * max(1.0, max_abs(tg)))
    return Budget(2 * ref_err["out"] + half_ulp, tuple(grads), ref_err)


def compare(out, grads, truth_out, truth_grads, budget: Budget) -> dict:
    """Errors against the f32 truth, each with its budget; status pass / fail."""
    res = dict(fwd=dict(err=max_err(out, truth_out), budget=budget.out))
    for name, g, tg, bud in zip(("dq", "dk", "dv"), grads, truth_grads, budget.grads,
                                strict=True):
        res[name] = dict(err=max_err(g, tg), budget=bud)
    for r in res.values():
        r["pass"] = bool(r["err"] <= r["budget"])
    res["fwd_pass"] = res["fwd"]["pass"]
    res["bwd_pass"] = all(res[n]["pass"] for n in ("dq", "dk", "dv"))
    res["status"] = "pass" if res["fwd_pass"] and res["bwd_pass"] else "fail"
    res["ref16_err"] = budget.ref_err
    return res


def refusal(verdicts: dict, impl: str) -> str | None:
    """None if ``impl`` can run the explained call, else its reason (from jaxattn.explain)."""
    if impl not in verdicts:
        return f"implementation {impl!r} is not registered ({sorted(verdicts)})"
    why = verdicts[impl]
    if why is None or why.startswith("usable"):
        return None
    return why


# ---- part: environment -----------------------------------------------------------------------


def peak_for(device_kind: str) -> tuple[float | None, str]:
    for key, tflops, note in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return tflops, note
    return None, f"no peak known for device kind {device_kind!r}; percent of peak not reported"


def part_environment(ctx: Context, log: PartLog) -> dict:
    jax, _ = _jax()

    def facts():
        dev = jax.devices()[0]
        peak, note = peak_for(dev.device_kind)
        mod = pallas_backend_module()
        info = dict(status="pass", jax=jax.__version__, python=sys.version.split()[0],
                    backend=jax.default_backend(), device_kind=dev.device_kind,
                    devices=[str(d) for d in jax.devices()],
                    compute_capability=getattr(dev, "compute_capability", None),
                    peak_tflops=peak, peak_note=note,
                    pallas_backend_module=None if mod is None else mod.__name__,
                    HARDWARE_VALIDATED=getattr(mod, "HARDWARE_VALIDATED", None))
        try:
            info["memory_bytes_limit"] = (dev.memory_stats() or {}).get("bytes_limit")
        except Exception:  # noqa: BLE001 - CPU devices have no memory stats
            info["memory_bytes_limit"] = None
        try:
            import jaxlib

            info["jaxlib"] = jaxlib.__version__
        except Exception:  # noqa: BLE001
            pass
        return info

    guarded(log, dict(what="environment"), facts)
    return {}


# ---- part: numerics --------------------------------------------------------------------------


def attention_cases(s: Sizes):
    """(name, dot_product_attention kwargs, the equivalent jaxattn Mask) per numerics case."""
    import numpy as np

    from jaxattn import masks as M

    b, t = s.attn[0], s.attn[1]
    cuts = [(round(0.3 * t) + 7 * i, round(0.62 * t) + 3 * i) for i in range(b)]  # unaligned
    ids = np.stack([np.searchsorted(c, np.arange(t), side="right") for c in cuts])
    ids = ids.astype(np.int32)
    return [
        ("causal", dict(is_causal=True), M.CausalMask()),
        ("document", dict(is_causal=True, query_segment_ids=_jax()[1].asarray(ids)),
         M.SegmentMask(ids) & M.CausalMask()),
        (f"window{s.window}", dict(mask=M.LocalMask((s.window, 0))), M.LocalMask((s.window, 0))),
    ]


def _identity(x):
    return x


@dataclasses.dataclass(frozen=True)
class Case:
    """One numerics case: ``attend(impl)(q, k, v) -> out``, its inputs and its mask on the
    flattened token axis (``flat`` maps outputs and inputs to ``[B, L, heads, dim]``)."""

    base: dict
    attend: object
    inputs: tuple  # q, k, v in the tested dtype, w (output cotangent) in f32
    mask: object
    verdicts: dict
    flat: object = _identity


def check_case(ctx: Context, log: PartLog, case: Case, impls, skip: dict):
    """Every implementation of ``case`` against the f32 reference within the 16-bit budget."""
    jax, jnp = _jax()
    q, k, v, w = case.inputs
    dtype, flat = q.dtype, case.flat
    f32 = lambda x: x.astype(jnp.float32)

    def baseline(q, k, v, w):
        truth = out_and_grads(case.attend("reference"))(f32(q), f32(k), f32(v), w)
        low = low_precision_reference(flat(q), flat(k), flat(v), case.mask, flat(w), dtype)
        return truth, low

    (t_out, t_grads), (l_out, l_grads) = ctx.jit(baseline)(q, k, v, w)
    t_out, t_grads = flat(t_out), [flat(g) for g in t_grads]
    bud = budgets(t_out, t_grads, l_out, l_grads, dtype)
    for impl in impls:
        label = case.base["impl_prefix"] + impl
        base = {**{n: x for n, x in case.base.items() if n != "impl_prefix"}, "impl": label}
        why = skip.get(impl) or refusal(case.verdicts, impl)
        if why is not None:
            log.add({**base, "status": "skipped", "reason": why})
            continue
        if out_of_time(ctx, log, base, 10):
            continue

        def run(impl=impl, label=label):
            both = ctx.jit(out_and_grads(case.attend(impl)))
            compiled, kernels = lowered_kernels(ctx.jit(case.attend(impl)), both, (q, k, v, w),
                                                label)
            out, grads = compiled(q, k, v, w)
            res = compare(flat(out), [flat(g) for g in grads], t_out, t_grads, bud)
            res["kernels"] = kernels
            return res

        guarded(log, base, run)


def attention_case(ctx: Context, spec, dtype_name: str) -> Case:
    _, jnp = _jax()
    import jaxattn

    name, kw, mask = spec
    b, t, n, kh, h = ctx.sizes.attn
    seed = zlib.crc32(f"{name}/{dtype_name}".encode()) % 1000
    q, k, v, w = random_inputs(seed, [(b, t, n, h), (b, t, kh, h), (b, t, kh, h), (b, t, n, h)],
                               jnp.dtype(dtype_name))
    attend = lambda impl: lambda q, k, v: jaxattn.dot_product_attention(
        q, k, v, implementation=impl, **kw)
    return Case(base=dict(what="attention", case=name, dtype=dtype_name, impl_prefix=""),
                attend=attend, inputs=(q, k, v, w.astype(jnp.float32)), mask=mask,
                verdicts=jaxattn.explain(q, k, v, **kw).verdicts)


def neighborhood_case(ctx: Context, kernel, stride, dtype_name: str) -> Case:
    _, jnp = _jax()
    import jaxattn
    from jaxattn import masks as M

    neighborhood_mask = first_attr("jaxattn.core.neighborhood:neighborhood_mask")
    spatial = ctx.sizes.na_spatial
    n, kh, h = ctx.sizes.na_heads
    length = _prod(spatial)
    shapes = [(1, *spatial, n, h), (1, *spatial, kh, h), (1, *spatial, kh, h), (1, *spatial, n, h)]
    q, k, v, w = random_inputs(sum(kernel) + sum(stride), shapes, jnp.dtype(dtype_name))
    attend = lambda impl: lambda q, k, v: jaxattn.neighborhood_attention(
        q, k, v, kernel, stride=stride, implementation=impl)
    mask = M.ArrayMask(neighborhood_mask(spatial, kernel, stride=stride)[None, None])
    return Case(base=dict(what="neighborhood", case=f"2d {spatial} k={kernel} s={stride}",
                          dtype=dtype_name, impl_prefix="na_"),
                attend=attend, inputs=(q, k, v, w.astype(jnp.float32)), mask=mask,
                verdicts=jaxattn.explain_neighborhood(q, k, v, kernel, stride=stride).verdicts,
                flat=lambda x: x.reshape(x.shape[0], length, *x.shape[-2:]))


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def part_numerics(ctx: Context, log: PartLog) -> dict:
    for dtype_name in ctx.dtypes:
        for spec in attention_cases(ctx.sizes):
            skip = {}
            if ctx.sizes.pallas_cases is not None and spec[0] not in ctx.sizes.pallas_cases:
                skip["pallas"] = (f"dry run: pallas-interpret is checked on "
                                  f"{ctx.sizes.pallas_cases} only (~8 s of CPU compile per case; "
                                  "tests/test_pallas_flash.py covers the rest on CPU)")
            _run_case(ctx, log, dict(what="attention", case=spec[0], dtype=dtype_name),
                      lambda spec=spec, d=dtype_name: attention_case(ctx, spec, d),
                      ("pallas", "cudnn", "xla_chunked"), skip)
        for kernel, stride in ctx.sizes.na_cases:
            _run_case(ctx, log, dict(what="neighborhood", case=f"k={kernel} s={stride}",
                                     dtype=dtype_name),
                      lambda k=kernel, s=stride, d=dtype_name: neighborhood_case(ctx, k, s, d),
                      ("pallas", "xla"), {})
    return {}


def _run_case(ctx, log, base, make, impls, skip):
    """Build a case (its setup may fail: recorded) and check it."""
    if out_of_time(ctx, log, base, 15):
        return
    try:
        check_case(ctx, log, make(), impls, skip)
    except Exception as e:  # noqa: BLE001 - the case's setup failed; go on with the next
        log.add({**base, "impl": "(setup)", "status": "error", "error": error_record(e)})


# ---- timing helpers --------------------------------------------------------------------------


def time_call(fn, args, warmup: int, reps: int) -> dict:
    """Compile + first call, ``warmup`` calls, then ``reps`` timed calls (block_until_ready)."""
    import statistics

    jax, _ = _jax()
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return dict(ms=1e3 * statistics.median(times), ms_min=1e3 * min(times), reps=len(times),
                compile_and_first_s=round(first, 2))


def timing_status(ctx: Context) -> str:
    return "exercised" if ctx.dry_run else "measured"


def device_peak() -> tuple[float | None, str]:
    jax, _ = _jax()
    return peak_for(jax.devices()[0].device_kind)


def pallas_tiles(q, k, v, kw) -> tuple[int, int, str]:
    """Tile sizes ``implementation="pallas"`` uses for this call (asked from the backend)."""
    try:
        make_call = first_attr("jaxattn.ops.call:make_call", "jaxattn.ops.attention:make_call")
        cfg = pallas_backend_module().flash_config_for(make_call(q, k, v, **kw)[0])
        return cfg.block_q, cfg.block_kv, f"pallas backend config (forward: {cfg.backend})"
    except Exception as e:  # noqa: BLE001 - fall back to the documented default
        return 128, 128, f"assumed 128 x 128 (could not ask the backend: {type(e).__name__})"


def computed_tiles(mask, b: int, n: int, t: int, s: int, bq: int, bk: int) -> dict:
    """Tiles a block-sparse kernel computes for ``mask``, over batch and heads."""
    info = mask.block_info(t, s, bq, bk)
    mb, mn = info.kind.shape[:2]
    per = (b // mb) * (n // mn)
    total = b * n * info.grid[0] * info.grid[1]
    return dict(visited=info.num_visited * per, total=total, block_q=bq, block_kv=bk)


def timed_label(ctx: Context, impl: str) -> str:
    return f"{impl} (dry-run stand-in for pallas)" if ctx.dry_run else impl


def fwd_kernel(fn, args, impl: str) -> str:
    """What the forward of ``fn`` lowered to (from the HLO), or "unknown"."""
    try:
        return _label(kernel_labels(fn.lower(*args).as_text()), impl)
    except Exception:  # noqa: BLE001 - the timing stands without the label
        return "unknown"


# ---- part: timing_attention ------------------------------------------------------------------


def time_dense_causal(ctx: Context, log: PartLog):
    jax, jnp = _jax()
    import jaxattn

    b, t, n, h = ctx.sizes.dense
    impl = ctx.sizes.timed[0]
    q, k, v = random_inputs(0, [(b, t, n, h)] * 3, jnp.bfloat16)
    flops = 4.0 * b * n * t * t * h / 2  # causal: half of the dense logits (FA convention)
    fns = {
        timed_label(ctx, impl): lambda q, k, v: jaxattn.dot_product_attention(
            q, k, v, is_causal=True, implementation=impl),
        "cudnn (jax.nn)": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"),
    }
    ms = {}
    for label, f in fns.items():
        base = dict(what="dense causal fwd", impl=label, shape=f"B={b} T=S={t} N={n} H={h} bf16")
        if label.startswith("cudnn") and jax.default_backend() != "gpu":
            log.add({**base, "status": "skipped", "reason": "cuDNN needs a GPU"})
            continue
        if out_of_time(ctx, log, base, 15):
            continue

        def run(f=f, label=label):
            fn = ctx.jit(f)
            res = time_call(fn, (q, k, v), ctx.sizes.warmup, ctx.sizes.reps)
            res.update(status=timing_status(ctx), tflops=flops / (res["ms"] * 1e-3) / 1e12,
                       flop_convention="4*B*N*T*S*H / 2 (causal half, as FlashAttention)",
                       kernels=dict(fwd=fwd_kernel(fn, (q, k, v), label.split()[0])))
            ms[label] = res["ms"]
            return res

        guarded(log, base, run)
    if len(ms) == 2:
        mine = ms[timed_label(ctx, impl)]
        log.add(dict(what="dense causal fwd", impl="ratio", status=timing_status(ctx),
                     cudnn_over_pallas_time=ms["cudnn (jax.nn)"] / mine,
                     note="t_cudnn / t_pallas, same run and inputs; > 1: pallas is faster"))


def document_ids(b: int, t: int, docs: int):
    """int32 ``[b, t]``: ``docs`` documents of random lengths per row (seeded)."""
    import numpy as np

    r = np.random.default_rng(0)
    cuts = np.sort(np.stack([r.choice(np.arange(1, t), size=docs - 1, replace=False)
                             for _ in range(b)]), axis=1)
    return np.stack([np.searchsorted(c, np.arange(t), side="right") for c in cuts]).astype(
        np.int32)


def time_document_fwd_bwd(ctx: Context, log: PartLog):
    jax, jnp = _jax()
    import jaxattn
    from jaxattn import masks as M

    b, t, n, h, docs = ctx.sizes.docs
    impl = ctx.sizes.timed[0]
    base = dict(what="document-masked fwd+bwd", impl=timed_label(ctx, impl),
                shape=f"B={b} T=S={t} N={n} H={h} bf16, {docs} documents per row, causal")
    if out_of_time(ctx, log, base, 20):
        return

    def run():
        ids = document_ids(b, t, docs)
        kw = dict(is_causal=True, query_segment_ids=jnp.asarray(ids))
        q, k, v, w = random_inputs(1, [(b, t, n, h)] * 4, jnp.bfloat16)
        bq, bk, tiles_from = pallas_tiles(q, k, v, kw)
        tiles = computed_tiles(M.SegmentMask(ids) & M.CausalMask(), b, n, t, t, bq, bk)
        flops = tiles["visited"] * 2.0 * bq * bk * (h + h) * 3.5  # bwd = 2.5 x fwd (FA)
        step = ctx.jit(out_and_grads(lambda q, k, v: jaxattn.dot_product_attention(
            q, k, v, implementation=impl, **kw)))
        res = time_call(step, (q, k, v, w.astype(jnp.float32)), ctx.sizes.warmup, ctx.sizes.reps)
        peak, note = device_peak()
        tflops = flops / (res["ms"] * 1e-3) / 1e12
        res.update(status=timing_status(ctx), tiles=tiles, tiles_from=tiles_from, tflops=tflops,
                   peak_tflops=peak, peak_note=note,
                   pct_of_peak=None if peak is None else 100 * tflops / peak,
                   flop_convention="tiles computed (mask.block_info on the pallas tile grid) x "
                                   "4*bq*bk*H (fwd) x 3.5 (fwd+bwd, FlashAttention convention)")
        return res

    guarded(log, base, run)


def part_timing_attention(ctx: Context, log: PartLog) -> dict:
    time_dense_causal(ctx, log)
    time_document_fwd_bwd(ctx, log)
    return _dry_skip(ctx)


def _dry_skip(ctx: Context) -> dict:
    if ctx.dry_run:
        return dict(skip_reason="timing needs a GPU; the dry run ran the timing code at tiny "
                                "shapes on CPU with XLA stand-ins, its numbers mean nothing")
    return {}


# ---- part: timing_neighborhood ---------------------------------------------------------------


def part_timing_neighborhood(ctx: Context, log: PartLog) -> dict:
    jax, jnp = _jax()
    import jaxattn

    spatial, kernel, stride, n, h = ctx.sizes.flux
    impl = ctx.sizes.timed[1]
    length = _prod(spatial)
    what = "tiny stand-in for FLUX-4K" if ctx.dry_run else "FLUX-4K workload"
    base = dict(what=f"neighborhood 2-D fwd ({what})", impl="na_" + timed_label(ctx, impl),
                shape=f"B=1 {spatial} k={kernel} s={stride} N={n} H={h} fp16")
    if out_of_time(ctx, log, base, 20):
        return _dry_skip(ctx)

    def run():
        need = 7 * length * n * h * 2  # q, k, v, out and the three permuted copies, fp16
        limit = _memory_limit()
        if limit is not None and need > 0.8 * limit:
            return dict(status="skipped", reason=f"needs ~{need >> 20} MiB of {limit >> 20}")
        q, k, v = random_inputs(2, [(1, *spatial, n, h)] * 3, jnp.float16)
        fn = ctx.jit(lambda q, k, v: jaxattn.neighborhood_attention(
            q, k, v, kernel, stride=stride, implementation=impl))
        res = time_call(fn, (q, k, v), ctx.sizes.warmup, max(1, ctx.sizes.reps // 2))
        sec = res["ms"] * 1e-3
        res.update(status=timing_status(ctx), natten_ms=NATTEN_FLUX_MS,
                   tflops_effective_vs_dense=4.0 * length * length * h * n / sec / 1e12,
                   kernels=dict(fwd=fwd_kernel(fn, (q, k, v), "na_" + impl)),
                   natten_note="NATTEN: GNA on H100, fp16, forward, 10.6 ms with the token "
                               "permutation (7.9 ms kernel only); ours includes the permutation "
                               "gathers too")
        res.update(planned_tiles(spatial, kernel, stride, n, h, sec))
        if not ctx.dry_run:
            res["natten_over_ours_time"] = NATTEN_FLUX_MS / res["ms"]
        return res

    guarded(log, base, run)
    return _dry_skip(ctx)


def planned_tiles(spatial, kernel, stride, n: int, h: int, sec: float) -> dict:
    """The planner's tile count for the Pallas kernel's tiles and the TFLOP/s over them."""
    import jaxattn

    try:
        tile = first_attr("jaxattn.ops.backends.neighborhood_pallas:default_pallas_tile",
                          "jaxattn.ops.neighborhood:default_pallas_tile")(spatial)
    except ImportError:
        tile = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}[len(spatial)]  # its documented default
    plan = jaxattn.plan_neighborhood(spatial, kernel, stride=stride, q_tile=tile, kv_tile=tile)
    blk = _prod(tile)
    return dict(tile=tile, planner=str(plan),
                tflops_computed_tiles=plan.visited_tiles * 4.0 * blk * blk * h * n / sec / 1e12)


def _memory_limit() -> int | None:
    jax, _ = _jax()
    try:
        return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - CPU devices have no memory stats
        return None


# ---- part: pytest ----------------------------------------------------------------------------

_RESULT_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_SUMMARY_LINE = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$")
_REFUSAL = re.compile(r"cannot run this call|needs head dims|no Pallas lowering")


def parse_pytest_log(text: str) -> dict:
    """Counts and failing ids from ``pytest -v -rfE`` output (complete or cut by a timeout)."""
    counts = collections.Counter()
    for m in map(_RESULT_LINE.match, text.splitlines()):
        if m:
            counts[m.group(2).lower()] += 1
    failures = {}
    for m in map(_SUMMARY_LINE.match, text.splitlines()):
        if m:
            failures[m.group(2)] = (m.group(3) or "")[:300]
    refused = sorted(t for t, why in failures.items() if _REFUSAL.search(why))
    finished = bool(re.search(r"^=+ .*\bin [\d.]+s", text, re.MULTILINE))
    return dict(passed=counts["passed"], failed=counts["failed"], errors=counts["error"],
                skipped=counts["skipped"], xfailed=counts["xfail"], xpassed=counts["xpass"],
                failures=failures, refused_on_platform=refused, finished=finished)


def run_subprocess(cmd, *, env, timeout: float, log_path: Path) -> tuple[int | None, bool]:
    """Run ``cmd`` (own process group, output to ``log_path``); kill the group at ``timeout``.
    Returns ``(returncode or None, timed_out)``."""
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout)), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, True


def part_pytest(ctx: Context, log: PartLog) -> dict:
    base_cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
    if ctx.dry_run:
        return collect_tests(ctx, log, base_cmd)
    env = dict(os.environ, JAX_PLATFORMS="cuda,cpu",  # conftest.py only setdefaults it
               JAXATTN_TEST_BUDGET_S="0",  # GPU compiles are slow; the timeouts bound the run
               COLUMNS="400")  # untruncated failure messages in the short summary
    for f, tests, cap, why in PYTEST_FILES:
        base = dict(what="pytest", file=f, select=tests, selection_note=why)
        if out_of_time(ctx, log, base, 15):
            continue
        cmd = base_cmd + ["-v", "-rfE", "--durations=5", *pytest_targets(f, tests)]
        path = ctx.out / f"pytest_{Path(f).stem}.log"

        def run(cmd=cmd, path=path, cap=cap):
            rc, timed_out = run_subprocess(cmd, env=env, timeout=min(cap, ctx.time_left()),
                                           log_path=path)
            res = parse_pytest_log(path.read_text())
            ok = rc == 0 and not timed_out and res["passed"] > 0
            res.update(rc=rc, timed_out=timed_out, log=path.name,
                       status="pass" if ok else ("error" if timed_out else "fail"))
            return res

        guarded(log, base, run)
    return {}


def collect_tests(ctx: Context, log: PartLog, base_cmd) -> dict:
    """Dry run: collect (not run) the selected tests on CPU, one subprocess for all files."""
    targets = [t for f, tests, *_ in PYTEST_FILES for t in pytest_targets(f, tests)]
    path = ctx.out / "pytest_collect.log"
    rc, timed_out = run_subprocess(base_cmd + ["--collect-only", "-q", *targets],
                                   env=dict(os.environ, JAX_PLATFORMS="cpu"),
                                   timeout=min(60, ctx.time_left()), log_path=path)
    text = path.read_text()
    for f, tests, _, why in PYTEST_FILES:
        n = sum(line.startswith(f + "::") for line in text.splitlines())
        ok = rc == 0 and n > 0
        log.add(dict(what="pytest", file=f, select=tests, selection_note=why,
                     status="skipped" if ok else "error", collected=n, rc=rc, timed_out=timed_out,
                     reason=f"dry run: collected {n} tests only; running them needs the GPU"
                     if ok else text[-1500:]))
    return dict(skip_reason="dry run: the test files are only collected (running them on CPU "
                            "is the ordinary test suite)")


PART_FUNCS = dict(environment=part_environment, numerics=part_numerics,
                  timing_attention=part_timing_attention,
                  timing_neighborhood=part_timing_neighborhood, pytest=part_pytest)


# ---- running parts: in this process or in a child with a timeout ------------------------------


def part_status(entries: list, extra: dict) -> str:
    states = {e.get("status") for e in entries}
    if states & {"fail", "error"}:
        return "fail"
    if extra.get("skip_reason"):
        return "skipped"
    if not entries or states == {"skipped"}:
        return "skipped"
    return "ok"


def run_part_here(name: str, ctx: Context, path: Path | None) -> dict:
    """Run one part in this process; always returns its record (errors included)."""
    log = PartLog(name, path)
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        extra = PART_FUNCS[name](ctx, log) or {}
        log.record.update(extra)
        log.record["status"] = part_status(log.record["entries"], extra)
    except Exception as e:  # noqa: BLE001 - recorded; the script goes on with the next part
        log.record.update(status="error", error=error_record(e))
    log.record["seconds"] = round(time.perf_counter() - t0, 1)
    log.record["cpu_seconds"] = round(time.process_time() - cpu0, 1)  # this process only
    log.flush()
    return log.record


def run_part_isolated(name: str, ctx: Context, budget: float, args) -> dict:
    """Run one part in a child process killed at ``budget`` s; partial entries are kept."""
    parts_dir = ctx.out / "parts"
    parts_dir.mkdir(exist_ok=True)
    path = parts_dir / f"{name}.json"
    path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--part-file",
           str(path), "--part-budget", str(budget), "--out", str(ctx.out),
           "--dtypes", *ctx.dtypes] + (["--dry-run"] if ctx.dry_run else [])
    t0 = time.perf_counter()
    # the child stops starting work at its budget; the kill is the backstop for a hang
    rc, timed_out = run_subprocess(cmd, env=dict(os.environ), timeout=budget + 20,
                                   log_path=parts_dir / f"{name}.log")
    record = json.loads(path.read_text()) if path.exists() else dict(part=name, entries=[])
    log_tail = (parts_dir / f"{name}.log").read_text()[-3000:]
    if timed_out:
        record.update(status="timeout", error=dict(
            type="TimeoutExpired", message=f"killed after {budget + 20:.0f} s",
            traceback=log_tail.splitlines()[-16:]))
    elif rc != 0 or record.get("status") in (None, "running"):
        record.update(status="error", error=dict(
            type="ChildProcessError", message=f"part process exited with {rc}",
            traceback=log_tail.splitlines()[-16:]))
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


# ---- summary: kernels, proposed flags, JSON and markdown --------------------------------------


def kernel_results(parts: dict) -> dict:
    """``{kernel id: {dtype: {passed, total, failures}}}`` from the numerics entries; a kernel
    id is ``<impl>.<fwd|bwd>.<what ran>`` (e.g. ``pallas.fwd.mosaic_gpu``)."""
    table: dict = collections.defaultdict(dict)
    for e in parts.get("numerics", {}).get("entries", []):
        if e.get("status") not in ("pass", "fail") or "kernels" not in e:
            continue
        for direction in ("fwd", "bwd"):
            kid = f"{e['impl']}.{direction}.{e['kernels'][direction]}"
            row = table[kid].setdefault(e["dtype"], dict(passed=0, total=0, failures=[]))
            row["total"] += 1
            if e[f"{direction}_pass"]:
                row["passed"] += 1
            else:
                row["failures"].append(e["case"])
    return dict(table)


def _pytest_file_verdict(parts: dict, test_file: str) -> tuple[bool, str]:
    """Did ``test_file`` pass on the device? Failures that are only platform refusals (tests
    whose shapes the GPU kernels refuse, e.g. head dim 16: they check no kernel) do not count
    against it; anything else, a timeout or an unfinished run does."""
    for e in parts.get("pytest", {}).get("entries", []):
        if e.get("file") != test_file:
            continue
        if e.get("status") == "pass":
            return True, f"{test_file}: {e['passed']} passed on the device"
        if e.get("status") == "skipped":
            return False, f"{test_file}: not run ({e.get('reason', '')[:80]})"
        failures, refused = set(e.get("failures", {})), set(e.get("refused_on_platform", []))
        if (e.get("finished") and not e.get("timed_out") and e.get("passed", 0) > 0
                and failures and failures <= refused):
            return True, (f"{test_file}: {e['passed']} passed on the device; its {len(failures)} "
                          "failures are all platform refusals (shapes the GPU kernels refuse)")
        bad = sorted(failures - refused)[:6]
        return False, (f"{test_file}: {e.get('failed', '?')} failed, {e.get('errors', '?')} "
                       f"errors ({len(refused)} platform refusals), timed_out="
                       f"{e.get('timed_out')}, finished={e.get('finished')} {bad}")
    return False, f"{test_file}: no result"


def propose_flags(parts: dict, kernels: dict, dry_run: bool) -> dict:
    """Proposed validation flag per GPU kernel and dtype (True only with evidence)."""
    flags = {}
    for kid, by_dtype in sorted(kernels.items()):
        impl, _, ran = kid.split(".")
        if impl not in ("pallas", "na_pallas"):
            continue  # cuDNN / XLA are not gated by jaxattn
        test_file = KERNEL_TEST_FILE["mosaic_gpu" if ran == "mosaic_gpu" else impl]
        tests_ok, tests_why = _pytest_file_verdict(parts, test_file)
        for dtype, row in sorted(by_dtype.items()):
            numerics_ok = row["total"] > 0 and row["passed"] == row["total"]
            reasons = [f"numerics {row['passed']}/{row['total']}"
                       + (f" (failed: {row['failures']})" if row["failures"] else ""), tests_why]
            value = numerics_ok and tests_ok and not dry_run and ran != "interpret"
            if dry_run or ran == "interpret":
                reasons.insert(0, "dry run / interpreter: no device evidence")
            flags[f"{kid}[{dtype}]"] = dict(value=value, why="; ".join(reasons))
    gpu_flags = [f for k, f in flags.items() if k.startswith("pallas.")]
    flags["HARDWARE_VALIDATED (jaxattn pallas backend, one flag today)"] = dict(
        value=bool(gpu_flags) and all(f["value"] for f in gpu_flags),
        why="True only if every pallas.* kernel/dtype above is True")
    return flags


def build_summary(parts: dict, ctx: Context, argv, started: str) -> dict:
    kernels = kernel_results(parts)
    env = next(iter(parts.get("environment", {}).get("entries", [])), {})
    return dict(schema=1, started=started, dry_run=ctx.dry_run, argv=list(argv),
                git_commit=_git_commit(), device_kind=env.get("device_kind"),
                jax=env.get("jax"), parts=parts, kernels=kernels,
                proposed_flags=propose_flags(parts, kernels, ctx.dry_run))


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


def _fmt(x, digits=3) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return "" if x is None else str(x)


def markdown(summary: dict) -> str:
    parts = summary["parts"]
    lines = [f"# jaxattn GPU check{' (DRY RUN on CPU)' if summary['dry_run'] else ''}", "",
             f"started {summary['started']}, commit `{summary['git_commit']}`, device "
             f"`{summary['device_kind']}`, jax {summary['jax']}", "",
             "| part | status | seconds | note |", "|---|---|---|---|"]
    for name, rec in parts.items():
        note = rec.get("skip_reason") or (rec.get("error") or {}).get("message", "")
        lines.append(f"| {name} | {rec.get('status')} | {rec.get('seconds')} | "
                     f"{_fmt(note)[:160]} |")
    lines += _md_environment(parts) + _md_numerics(parts) + _md_kernels(summary)
    lines += _md_timing(parts) + _md_pytest(parts) + _md_errors(parts)
    return "\n".join(lines) + "\n"


def _md_environment(parts) -> list[str]:
    env = next(iter(parts.get("environment", {}).get("entries", [])), None)
    if not env or env.get("status") != "pass":
        return []
    return ["", "## Environment", "",
            f"backend {env['backend']}, devices {env['devices']}, compute capability "
            f"{env.get('compute_capability')}, jaxlib {env.get('jaxlib')}, python {env['python']}",
            f"peak used: {env['peak_note']}",
            f"pallas backend module `{env['pallas_backend_module']}`, HARDWARE_VALIDATED = "
            f"{env['HARDWARE_VALIDATED']}"]


def _md_numerics(parts) -> list[str]:
    entries = parts.get("numerics", {}).get("entries", [])
    lines = ["", "## Numerics against implementation=\"reference\" (f32)", "",
             "Budget per result: 2 x the error of a 16-bit evaluation of the reference + half "
             "an ulp at the result's scale. err / budget columns; kernels from the lowered HLO.",
             "", "| case | dtype | impl | status | kernels fwd / bwd | out | dq | dk | dv |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        head = f"| {e.get('case')} | {e.get('dtype')} | {e.get('impl')} | {e.get('status')} "
        if e.get("status") in ("pass", "fail"):
            cells = [f"{e[n]['err']:.2e} / {e[n]['budget']:.2e}" + ("" if e[n]["pass"] else " ✗")
                     for n in ("fwd", "dq", "dk", "dv")]
            lines.append(head + f"| {e['kernels']['fwd']} / {e['kernels']['bwd']} | "
                         + " | ".join(cells) + " |")
        else:
            why = e.get("reason") or (e.get("error") or {}).get("message", "")
            lines.append(head + f"| {_fmt(why)[:120]} | | | | |")
    return lines


def _md_kernels(summary) -> list[str]:
    lines = ["", "## Per kernel and dtype; proposed flags", "",
             "| kernel | dtype | numerics passed | failed cases |", "|---|---|---|---|"]
    for kid, by_dtype in sorted(summary["kernels"].items()):
        for dtype, row in sorted(by_dtype.items()):
            lines.append(f"| {kid} | {dtype} | {row['passed']}/{row['total']} | "
                         f"{', '.join(row['failures'])} |")
    lines += ["", "| proposed flag | value | why |", "|---|---|---|"]
    for name, f in summary["proposed_flags"].items():
        lines.append(f"| {name} | **{f['value']}** | {f['why'][:300]} |")
    return lines


def _md_timing(parts) -> list[str]:
    lines = ["", "## Timing", ""]
    for name in ("timing_attention", "timing_neighborhood"):
        for e in parts.get(name, {}).get("entries", []):
            head = f"- {e.get('what')} / {e.get('impl')} ({e.get('shape', '')}): {e.get('status')}"
            if "ms" in e:
                keys = ("ms", "ms_min", "tflops", "pct_of_peak", "tflops_computed_tiles",
                        "natten_over_ours_time", "compile_and_first_s")
                head += ", " + ", ".join(f"{k} {_fmt(e[k])}" for k in keys if e.get(k) is not None)
                head += f", kernels {e.get('kernels', {})}" if e.get("kernels") else ""
                head += f", tiles {e['tiles']}" if e.get("tiles") else ""
            elif "cudnn_over_pallas_time" in e:
                head += f": t_cudnn / t_pallas = {e['cudnn_over_pallas_time']:.3f} ({e['note']})"
            else:
                head += f": {e.get('reason') or (e.get('error') or {}).get('message', '')}"
            lines.append(head[:600])
    notes = {e.get("peak_note") for n in ("timing_attention",)
             for e in parts.get(n, {}).get("entries", []) if e.get("peak_note")}
    notes |= {e.get("natten_note") for e in parts.get("timing_neighborhood", {}).get(
        "entries", []) if e.get("natten_note")}
    lines += [f"- note: {n}" for n in sorted(notes)]
    return lines


def _md_pytest(parts) -> list[str]:
    lines = ["", "## Tests on the device", "",
             "| file | status | passed | failed | errors | skipped | note |",
             "|---|---|---|---|---|---|---|"]
    for e in parts.get("pytest", {}).get("entries", []):
        note = e.get("reason") or ""
        if e.get("refused_on_platform"):
            note += f" {len(e['refused_on_platform'])} failures are platform refusals"
        if e.get("select"):
            note += f" (only {', '.join(e['select'])}: {e.get('selection_note', '')})"
        lines.append(f"| {e.get('file')} | {e.get('status')} | {_fmt(e.get('passed'))} | "
                     f"{_fmt(e.get('failed'))} | {_fmt(e.get('errors'))} | "
                     f"{_fmt(e.get('skipped'))} | {note[:200]} |")
        for test, why in sorted(e.get("failures", {}).items())[:20]:
            lines.append(f"|  {test} | failed | | | | | {why[:160]} |")
    return lines


def _md_errors(parts) -> list[str]:
    lines = []
    for name, rec in parts.items():
        errs = [rec["error"]] if rec.get("error") else []
        errs += [e["error"] for e in rec.get("entries", []) if e.get("error")]
        for err in errs:
            lines += ["", f"### {name}: {err['type']}: {err['message'][:300]}", "", "```",
                      *err.get("traceback", [])[-12:], "```"]
    return (["", "## Errors"] + lines) if lines else []


# ---- command line ----------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (summary.json, summary.md)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shapes, Pallas interpret mode; timing only exercised")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--dtypes", nargs="+", default=None, choices=("bfloat16", "float16"),
                   help="numerics dtypes (default: bfloat16 float16; dry run: bfloat16); the "
                        "budgets are 16-bit budgets, f32 is covered by the test files")
    p.add_argument("--total-budget", type=float, default=None,
                   help=f"seconds for the whole run (default {TOTAL_BUDGET_S}; dry run: the sum of "
                        "its part budgets); parts that cannot start in it are skipped")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="one child process per part (default on a GPU run)")
    iso.add_argument("--no-isolate", dest="isolate", action="store_false",
                     help="all parts in this process (default for --dry-run)")
    # internal: run one part in a child process
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--part-file", help=argparse.SUPPRESS)
    p.add_argument("--part-budget", type=float, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_context(args) -> Context:
    dtypes = tuple(args.dtypes or (("bfloat16",) if args.dry_run else ("bfloat16", "float16")))
    return Context(dry_run=args.dry_run, out=Path(args.out), dtypes=dtypes,
                   sizes=DRY_SIZES if args.dry_run else GPU_SIZES, deadline=0.0,
                   compiler_options=dict(xla_backend_optimization_level=0) if args.dry_run
                   else None)


def main(argv=None) -> int:
    """Run the check; returns 0 when the summary was written (whatever the results)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.dry_run and "jax" not in sys.modules:
        os.environ["JAX_PLATFORMS"] = "cpu"
    ctx = make_context(args)
    ctx.out.mkdir(parents=True, exist_ok=True)
    if args.part:  # child: one part, record to --part-file
        ctx.deadline = time.monotonic() + args.part_budget
        run_part_here(args.part, ctx, Path(args.part_file))
        return 0
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    isolate = (not args.dry_run) if args.isolate is None else args.isolate
    budgets_s = DRY_BUDGETS if args.dry_run else GPU_BUDGETS
    total = args.total_budget or (sum(budgets_s.values()) if args.dry_run else TOTAL_BUDGET_S)
    end = time.monotonic() + total
    parts = {}
    for name in PARTS:
        if name not in args.parts:
            parts[name] = dict(part=name, status="skipped", entries=[],
                               skip_reason="not selected (--parts)")
            continue
        budget = min(budgets_s[name], end - time.monotonic())
        if budget < 10:
            parts[name] = dict(part=name, status="skipped", entries=[],
                               skip_reason=f"total budget exhausted ({budget:.0f} s left)")
            continue
        ctx.deadline = time.monotonic() + budget
        if isolate and name != "pytest":  # pytest already runs in subprocesses
            parts[name] = run_part_isolated(name, ctx, budget, args)
        else:
            parts[name] = run_part_here(name, ctx, None)
        parts[name]["budget_s"] = round(budget, 1)
        print(f"[gpu_check] {name}: {parts[name]['status']} ({parts[name]['seconds']} s)",
              flush=True)
    summary = build_summary(parts, ctx, argv, started)
    (ctx.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (ctx.out / "summary.md").write_text(markdown(summary))
    print(f"[gpu_check] wrote {ctx.out / 'summary.json'} and {ctx.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
