"""``benchmarks/gpu_check.py``, the one-command Hopper validation, checked on CPU.

* One dry run (CPU, tiny shapes, Pallas interpret mode; ~15 s on one core, nearly all of it the
  compile of the interpreted kernels) checked through its JSON and markdown: every part is
  reported, the numerics that can run on CPU pass, and what needs a GPU is skipped with a reason.
  It is a single test so that xdist never runs the dry run twice.
* The logic that only a GPU run reaches (pytest log parsing, kernel labels from HLO, the flag
  proposals, child processes and their timeouts, error records) on synthetic inputs.
"""

import importlib.util
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn import masks as M
from jaxattn.core import dense

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


gc = _load_script()


# ---- the dry run ---------------------------------------------------------------------------


def _entries(summary, part):
    return summary["parts"][part]["entries"]


def _check_every_part_reported(summary, md):
    assert summary["dry_run"] is True
    assert list(summary["parts"]) == list(gc.PARTS)
    for name, rec in summary["parts"].items():
        assert rec["status"] in ("ok", "skipped"), (name, rec.get("error"), rec["status"])
        assert rec["entries"], f"part {name} recorded nothing"
        assert f"| {name} | {rec['status']} |" in md
    for rec in summary["parts"].values():
        for e in rec["entries"]:
            assert "budget exhausted" not in e.get("reason", ""), e


def _check_numerics_pass_on_cpu(summary):
    numerics = _entries(summary, "numerics")
    assert summary["parts"]["numerics"]["status"] == "ok"
    for e in numerics:
        if e["status"] == "skipped":
            assert e["reason"], e
        else:
            assert e["status"] == "pass", e
            assert all(e[n]["err"] <= e[n]["budget"] for n in ("fwd", "dq", "dk", "dv"))
    passed = {(e["impl"], e["case"]) for e in numerics if e["status"] == "pass"}
    cases = [name for name, *_ in gc.attention_cases(gc.DRY_SIZES)]
    assert {("xla_chunked", c) for c in cases} <= passed
    assert ("pallas", "document") in passed
    assert {impl for impl, _ in passed} >= {"na_pallas", "na_xla"}
    kernels = {e["impl"]: e["kernels"] for e in numerics if e["status"] == "pass"}
    assert kernels["pallas"] == dict(fwd="interpret", bwd="interpret")
    assert kernels["xla_chunked"] == dict(fwd="xla", bwd="xla")
    cudnn = [e for e in numerics if e["impl"] == "cudnn"]
    assert len(cudnn) == len(cases) and all(
        e["status"] == "skipped" and "GPU" in e["reason"] for e in cudnn)


def _check_gpu_parts_skipped_with_reason(summary):
    for name in ("timing_attention", "timing_neighborhood", "pytest"):
        rec = summary["parts"][name]
        assert rec["status"] == "skipped" and rec["skip_reason"], name
    timing = _entries(summary, "timing_attention") + _entries(summary, "timing_neighborhood")
    exercised = [e for e in timing if e["status"] == "exercised"]
    assert len(exercised) == 3 and all(e["ms"] > 0 for e in exercised)
    skipped = [e for e in timing if e["status"] == "skipped"]
    assert [e["impl"] for e in skipped] == ["cudnn (jax.nn)"] and skipped[0]["reason"]
    docs = next(e for e in timing if e["what"] == "document-masked fwd+bwd")
    assert 0 < docs["tiles"]["visited"] <= docs["tiles"]["total"]
    files = {e["file"]: e for e in _entries(summary, "pytest")}
    assert list(files) == [f for f, *_ in gc.PYTEST_FILES]
    for e in files.values():
        assert e["status"] == "skipped" and e["collected"] > 0 and "GPU" in e["reason"], e
    mosaic = files["tests/test_pallas_flash_mosaic_gpu.py"]
    assert mosaic["collected"] >= 3  # the selected node ids exist (two hopper + lowering cases)


def _check_flags(summary):
    flags = summary["proposed_flags"]
    assert any(k.startswith("HARDWARE_VALIDATED") for k in flags)
    assert {"pallas.fwd.interpret[bfloat16]", "na_pallas.bwd.interpret[bfloat16]"} <= set(flags)
    assert not any(f["value"] for f in flags.values()), "a dry run must never validate a flag"


def test_dry_run_writes_a_complete_summary(tmp_path):
    assert gc.main(["--dry-run", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# jaxattn GPU check (DRY RUN on CPU)")
    _check_every_part_reported(summary, md)
    _check_numerics_pass_on_cpu(summary)
    _check_gpu_parts_skipped_with_reason(summary)
    _check_flags(summary)


# ---- device-only logic on synthetic inputs ---------------------------------------------------


def test_low_precision_reference_is_the_exact_gradient_in_f32():
    """In f32 (no rounding) the hand-written flash backward equals autodiff of the reference:
    the 16-bit budgets are built on it."""
    r = np.random.default_rng(0)
    q, w = (jnp.asarray(r.normal(size=(2, 24, 4, 8)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(r.normal(size=(2, 24, 2, 8)), jnp.float32) for _ in range(2))
    mask = M.CausalMask() & M.LocalMask((9, 0))
    emulated = jax.jit(lambda q, k, v, w: gc.low_precision_reference(q, k, v, mask, w,
                                                                      jnp.float32))
    exact = jax.jit(gc.out_and_grads(lambda q, k, v: dense.attention_reference(q, k, v,
                                                                               mask=mask)))
    (out, grads), (r_out, r_grads) = emulated(q, k, v, w), exact(q, k, v, w)
    # f32 both ways, only the summation order differs (errors ~1e-6 on O(1) values)
    assert gc.max_err(out, r_out) < 1e-5
    for g, r in zip(grads, r_grads, strict=True):
        assert gc.max_err(g, r) < 1e-4


def test_budgets_and_compare_flag_results_over_budget():
    truth = jnp.zeros((4,))
    grads = [jnp.zeros((4,))] * 3
    low = jnp.full((4,), 0.01)
    bud = gc.budgets(truth, grads, low, [low] * 3, jnp.bfloat16)
    assert bud.out == pytest.approx(2 * 0.01 + 2.0**-8, rel=1e-3)
    ok = gc.compare(jnp.full((4,), 0.02), [truth] * 3, truth, grads, bud)
    assert ok["status"] == "pass" and ok["fwd_pass"] and ok["bwd_pass"]
    bad = gc.compare(truth, [truth, jnp.full((4,), 0.05), truth], truth, grads, bud)
    assert bad["status"] == "fail" and bad["fwd_pass"] and not bad["dk"]["pass"]


VERBOSE_LOG = """\
tests/test_pallas_flash.py::test_a[causal] PASSED                          [ 20%]
tests/test_pallas_flash.py::test_a[local] FAILED                           [ 40%]
tests/test_pallas_flash.py::test_b ERROR                                   [ 60%]
tests/test_pallas_flash.py::test_c SKIPPED (no Hopper)                     [ 80%]
tests/test_pallas_flash.py::test_d FAILED                                  [100%]
=========================== short test summary info ============================
FAILED tests/test_pallas_flash.py::test_a[local] - ValueError: pallas cannot run this call: \
on gpu the kernel needs head dims in (64, 128, 256), got H=16, Hv=16
ERROR tests/test_pallas_flash.py::test_b - RuntimeError: ptxas failed
FAILED tests/test_pallas_flash.py::test_d - AssertionError: assert 0.3 <= 0.01
============ 2 failed, 1 passed, 1 skipped, 1 error in 12.34s =============
"""


def test_parse_pytest_log_counts_and_classifies_failures():
    res = gc.parse_pytest_log(VERBOSE_LOG)
    assert (res["passed"], res["failed"], res["errors"], res["skipped"]) == (1, 2, 1, 1)
    assert res["finished"]
    assert set(res["failures"]) == {"tests/test_pallas_flash.py::test_a[local]",
                                    "tests/test_pallas_flash.py::test_b",
                                    "tests/test_pallas_flash.py::test_d"}
    assert res["refused_on_platform"] == ["tests/test_pallas_flash.py::test_a[local]"]
    cut = gc.parse_pytest_log("\n".join(VERBOSE_LOG.splitlines()[:2]))  # killed by a timeout
    assert (cut["passed"], cut["failed"], cut["finished"]) == (1, 1, False)


def test_kernel_labels_read_custom_calls_from_hlo():
    hlo = """
      %0 = stablehlo.custom_call @mosaic_gpu_v2(%arg0) {backend_config = "..."}
      %1 = stablehlo.custom_call @__gpu$xla.gpu.triton(%0) {name = "flash_dq"}
      %2 = stablehlo.custom_call @__gpu$xla.gpu.triton(%1) {name = "flash_dkv"}
      custom_call_target="x" call_target_name = "__cudnn$fmhaSoftmax"
      %3 = stablehlo.custom_call @Sharding(%2)
    """
    found = gc.kernel_labels(hlo)
    assert found == {"mosaic_gpu": 1, "triton": 2, "cudnn": 1}
    assert gc._label(found - gc.kernel_labels(hlo.splitlines()[1]), "pallas") == "cudnn+triton"
    assert gc._label(gc.kernel_labels(""), "pallas") == "interpret"
    assert gc._label(gc.kernel_labels(""), "xla_chunked") == "xla"


def _gpu_parts(mosaic_tests="pass", flash_tests="pass", doc_fwd_pass=True):
    def entry(case, fwd, fwd_pass=True):
        return dict(what="attention", case=case, dtype="bfloat16", impl="pallas", status="pass"
                    if fwd_pass else "fail", fwd_pass=fwd_pass, bwd_pass=True,
                    kernels=dict(fwd=fwd, bwd="triton"))

    numerics = [entry("causal", "mosaic_gpu"), entry("document", "triton", doc_fwd_pass),
                entry("window256", "mosaic_gpu"),
                dict(what="attention", case="causal", dtype="bfloat16", impl="cudnn",
                     status="pass", fwd_pass=True, bwd_pass=True,
                     kernels=dict(fwd="cudnn", bwd="cudnn"))]
    pytest_entries = [
        dict(file="tests/test_pallas_flash_mosaic_gpu.py", status=mosaic_tests, passed=5,
             failed=0 if mosaic_tests == "pass" else 1, errors=0, failures={}),
        dict(file="tests/test_pallas_flash.py", status=flash_tests, passed=30, failed=0,
             errors=0, failures={})]
    return dict(numerics=dict(entries=numerics), pytest=dict(entries=pytest_entries))


def test_flags_are_true_only_with_passing_numerics_and_device_tests():
    hw = "HARDWARE_VALIDATED (jaxattn pallas backend, one flag today)"
    parts = _gpu_parts()
    flags = gc.propose_flags(parts, gc.kernel_results(parts), dry_run=False)
    assert set(flags) == {"pallas.fwd.mosaic_gpu[bfloat16]", "pallas.fwd.triton[bfloat16]",
                          "pallas.bwd.triton[bfloat16]", hw}  # cuDNN is not gated: no flag
    assert all(f["value"] for f in flags.values())
    assert gc.kernel_results(parts)["pallas.bwd.triton"]["bfloat16"]["total"] == 3

    parts = _gpu_parts(mosaic_tests="fail")
    flags = gc.propose_flags(parts, gc.kernel_results(parts), dry_run=False)
    assert not flags["pallas.fwd.mosaic_gpu[bfloat16]"]["value"]
    assert flags["pallas.fwd.triton[bfloat16]"]["value"] and not flags[hw]["value"]

    parts = _gpu_parts(doc_fwd_pass=False)
    flags = gc.propose_flags(parts, gc.kernel_results(parts), dry_run=False)
    assert not flags["pallas.fwd.triton[bfloat16]"]["value"]
    assert "document" in flags["pallas.fwd.triton[bfloat16]"]["why"]

    parts = _gpu_parts()
    flags = gc.propose_flags(parts, gc.kernel_results(parts), dry_run=True)
    assert not any(f["value"] for f in flags.values())


def test_platform_refusals_do_not_fail_a_test_file_other_failures_do():
    flash = "tests/test_pallas_flash.py"
    refused = "tests/test_pallas_flash.py::test_a[h16]"
    record = dict(file=flash, status="fail", passed=20, failed=1, errors=0, finished=True,
                  timed_out=False, failures={refused: "ValueError: pallas cannot run this call"},
                  refused_on_platform=[refused])
    ok, why = gc._pytest_file_verdict(dict(pytest=dict(entries=[record])), flash)
    assert ok and "platform refusals" in why
    worse = dict(record, failed=2, failures={**record["failures"], "t::b": "AssertionError"})
    assert not gc._pytest_file_verdict(dict(pytest=dict(entries=[worse])), flash)[0]
    cut = dict(record, finished=False, timed_out=True)
    assert not gc._pytest_file_verdict(dict(pytest=dict(entries=[cut])), flash)[0]


def test_a_failing_part_is_recorded_and_the_run_goes_on(monkeypatch):
    def broken(ctx, log):
        gc.guarded(log, dict(what="one check"), lambda: 1 / 0)  # an entry fails, part goes on
        raise RuntimeError("the part itself breaks")

    monkeypatch.setitem(gc.PART_FUNCS, "environment", broken)
    rec = gc.run_part_here("environment", None, None)
    assert rec["status"] == "error"
    assert rec["error"]["type"] == "RuntimeError" and rec["error"]["traceback"]
    assert rec["entries"][0]["error"]["type"] == "ZeroDivisionError"


def test_subprocess_is_killed_at_its_timeout(tmp_path):
    rc, timed_out = gc.run_subprocess([sys.executable, "-c", "import time; time.sleep(60)"],
                                      env=None, timeout=1, log_path=tmp_path / "log")
    assert rc is None and timed_out


def test_isolated_part_runs_in_a_child_process(tmp_path):
    """The GPU mode: a part in its own process, its record merged back; unselected parts are
    reported as skipped."""
    assert gc.main(["--dry-run", "--isolate", "--parts", "environment", "--out",
                    str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    env = summary["parts"]["environment"]
    assert env["status"] == "ok" and env["entries"][0]["backend"] == "cpu"
    assert (tmp_path / "parts" / "environment.json").exists()
    assert all(summary["parts"][p]["status"] == "skipped" for p in gc.PARTS[1:])


FAKE_TESTS = """
def test_ok():
    pass

def test_bad():
    assert 1 == 2, "a wrong number"
"""


def test_device_pytest_part_counts_a_real_pytest_run(tmp_path, monkeypatch):
    """The GPU branch of the pytest part (subprocess, log parsing, status) on a tiny test file
    that needs no device."""
    fake = tmp_path / "test_fake.py"
    fake.write_text(FAKE_TESTS)
    monkeypatch.setattr(gc, "PYTEST_FILES", ((str(fake), ("test_ok", "test_bad"), 60, ""),))
    ctx = gc.Context(dry_run=False, out=tmp_path, sizes=gc.GPU_SIZES, dtypes=("bfloat16",),
                     deadline=time.monotonic() + 120)
    log = gc.PartLog("pytest", None)
    assert gc.part_pytest(ctx, log) == {}
    (entry,) = log.record["entries"]
    assert entry["status"] == "fail" and (entry["passed"], entry["failed"]) == (1, 1)
    assert entry["rc"] == 1 and entry["finished"] and not entry["timed_out"]
    (failed, why), = entry["failures"].items()
    assert failed.endswith("test_fake.py::test_bad") and "a wrong number" in why
