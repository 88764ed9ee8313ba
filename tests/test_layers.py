"""The package's modules import only modules above them in the layer order of STYLE.md (and model.py no optax,
orbax or tiktoken), so that each layer can be read, tested and replaced without the ones below it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gpt2_jax"
# STYLE.md's layout, top to bottom; tf_checkpoint and torch_ref sit beside the layer that reads them.
ORDER = ["config", "tokenizer", "cpu_kernels", "checks", "attention", "model", "data", "optim", "training", "strategies",
         "engine", "sampling", "sharding", "weight_files", "tf_checkpoint", "layouts", "checkpoint", "torch_ref",
         "convert", "compare", "evaluate", "lm_eval", "flops", "dashboards", "metrics", "run_config", "huge_pages",
         "run", "batch_sampling"]


def imported_modules(path: Path) -> set[str]:
    """The gpt2_jax modules that a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "gpt2_jax":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gpt2_jax."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("gpt2_jax."))
    return found


def test_every_module_has_a_place_in_the_order():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules <= set(ORDER), f"modules missing from ORDER: {sorted(modules - set(ORDER))}"


@pytest.mark.parametrize("module", [m for m in ORDER if (PACKAGE / f"{m}.py").exists()])
def test_a_module_imports_only_modules_above_it(module):
    below = set(ORDER[ORDER.index(module):]) & imported_modules(PACKAGE / f"{module}.py")
    assert not below, f"gpt2_jax/{module}.py imports {sorted(below)}, which STYLE.md places at or below it"


def test_the_model_needs_no_optimizer_checkpointing_or_tokenizer_library():
    tree = ast.parse((PACKAGE / "model.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not roots & {"optax", "orbax", "tiktoken"}
