"""Import hygiene: ``import jaxattn`` stays light and the kernels load only when used."""

import ast
import pathlib
import subprocess
import sys

import pytest

_PROBE = """
import sys
import jaxattn
heavy = sorted(m for m in sys.modules
               if m == "jax.experimental.pallas.mosaic_gpu" or m.split(".")[0] == "pallas_kernels")
print(",".join(heavy))
"""


def _modules_after(code: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return [m for m in line.split(",") if m]


def test_import_jaxattn_loads_no_kernels():
    """Neither the Mosaic-GPU Pallas module nor any ``pallas_kernels`` module is imported by
    ``import jaxattn`` (the Pallas backends import their kernels on first use)."""
    assert _modules_after(_PROBE) == []


def test_pallas_backend_loads_kernels_on_first_use():
    """The probe above can fail: running the Pallas backend does import the flash kernels."""
    pytest.importorskip("pallas_kernels")
    code = _PROBE.replace("import jaxattn\n", (
        "import jaxattn, jax.numpy as jnp\n"
        "x = jnp.ones((1, 16, 1, 8))\n"
        "jaxattn.dot_product_attention(x, x, x, implementation='pallas')\n"))
    assert "pallas_kernels.flash" in _modules_after(code)


def _imported_modules(path: pathlib.Path) -> set[str]:
    """Every module an ``import`` / ``from .. import`` statement in ``path`` names (with
    ``from pkg import name`` also giving ``pkg.name``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_backends_never_import_the_public_primitive_modules():
    """No import cycle: backends (and call.py) import call.py and registry.py, never the public
    ``jaxattn.ops.attention`` / ``jaxattn.ops.neighborhood`` that import them."""
    import jaxattn.ops.backends as backends_pkg

    ops = pathlib.Path(backends_pkg.__file__).parent.parent
    files = sorted((ops / "backends").glob("*.py")) + [ops / "call.py"]
    assert len(files) >= 8
    public = {"jaxattn.ops.attention", "jaxattn.ops.neighborhood"}
    for path in files:
        assert not _imported_modules(path) & public, f"{path.name} imports a public module"
