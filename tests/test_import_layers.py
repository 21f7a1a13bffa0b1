"""The package's layers import only downwards: slides -> tiling -> models -> segmentation -> outputs -> front ends.

Checked on the source (every import statement, including those inside functions), so a module that
reaches back up fails here before it becomes a tangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsi_espnet"

#: Top-level module or package -> layer; a module may import from its own layer or lower ones.
LAYERS: dict[str, int] = {
    "__init__": 0, "__main__": 7, "errors": 0, "atomic_files": 0, "geometry": 0, "devices": 0, "heap": 0,
    "yaml_documents": 0,
    "slides": 1, "tissue_detection": 1, "stain": 1,
    "tiling": 2,
    "models": 3, "inference": 3,
    "segmentation": 4,
    "outputs": 5,
    "datasets": 6, "evaluation": 6, "training": 6, "segment_slide": 6, "demo": 6, "batch": 6,
    "cli": 7,
}  # fmt: skip
#: Pairs that the layer numbers alone would allow but that must not exist.
FORBIDDEN = {("training", "segmentation"), ("training", "segment_slide"), ("training", "outputs")}


def _top(module: str) -> str:
    return module.split(".")[1] if module.startswith("wsi_espnet.") else "__init__"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wsi_espnet"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("wsi_espnet"))
    return names


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in SOURCES}
    assert tops <= set(LAYERS), f"modules without a layer: {sorted(tops - set(LAYERS))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_only_downwards(path: Path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    for imported in _imports(path):
        target = _top(imported)
        if target == own:
            continue
        assert LAYERS[target] <= LAYERS[own], f"{own} (layer {LAYERS[own]}) imports {imported} (layer {LAYERS[target]})"
        assert (own, target) not in FORBIDDEN, f"{own} must not import {imported}"


def test_reading_a_mask_does_not_import_torch():
    """The napari reader and wsi_espnet.outputs load lazily: torch (about 2 s) only comes with the model."""
    import subprocess
    import sys

    code = (
        "import sys, wsi_espnet.outputs, wsi_espnet.segmentation as s; import wsi_espnet_napari.reader; "
        "assert 'torch' not in sys.modules, 'torch'; "
        "assert sorted(s.__all__) == sorted(s._HOMES), 'exports'; "
        "[getattr(s, name) for name in s.__all__]; assert 'torch' in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
