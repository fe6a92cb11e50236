"""
The layers of guided_diffusion (docs/design.md, "Layers"): every module has a
layer, no module imports one of a layer above its own, and the picture in the
design document names every module where this test places it.

guided-diffusion's own modules keep their places (``guided_diffusion.unet``, ...), so
code written against the original keeps importing them; what was built around them
lives in subpackages by job. The layer of a module, not its folder, decides what it
may import: the foundations (settings, samplers, rasters, ...) sit below the
original's modules that import them.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "guided_diffusion"

# layer -> (its name in docs/design.md, its modules; "pkg.*" is every module there)
LAYERS = {
    0: ("foundations", ["base.*", "io", "io.rasters", "io.geotiff", "io.warp", "io.sentinel1", "io.pictures", "translation.tiling"]),
    1: ("guided-diffusion", ["nn", "fp16_util", "losses", "unet", "gaussian_diffusion",
                             "original_sampling", "respace", "resample", "script_util",
                             "dist_util", "logger", "image_datasets"]),  # fmt: skip
    2: ("files", ["io.checkpoints", "io.results"]),
    3: ("training", ["train_util", "distillation"]),
    4: ("translation", ["translation.*"]),
    5: ("evaluation", ["evaluation.*"]),
    6: ("applications", ["page.*", "demo.*"]),
}


def modules():
    """Every module of the package: dotted name under guided_diffusion -> path."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer_of(name):
    """The layer of a module (by its dotted name under guided_diffusion), or None."""
    best = None
    for layer, (_, members) in LAYERS.items():
        for member in members:
            if member == name:
                return layer  # named: before any pattern
            if member.endswith(".*") and (name + ".").startswith(member[:-1]):
                best = layer if best is None else best
    return best


def imports_of(name, path, known):
    """The package's modules that a module imports (dotted, under guided_diffusion)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    if not is_package:
        here = here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                module = "guided_diffusion" + ("." + module if module else "")
            else:
                module = node.module
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        for target in targets:
            if target == "guided_diffusion" or not target.startswith("guided_diffusion."):
                continue
            short = target.removeprefix("guided_diffusion.")
            if short in known:
                found.add(short)
    return found - {name}


def test_every_module_has_a_layer():
    missing = sorted(n for n in modules() if n and layer_of(n) is None)
    assert not missing, f"modules without a layer (add them to LAYERS and the picture): {missing}"


def test_no_module_imports_a_layer_above_its_own():
    known = modules()
    upward = []
    for name, path in known.items():
        if not name:
            continue
        for target in imports_of(name, path, known):
            if target in known and layer_of(target) > layer_of(name):
                upward.append(
                    f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]})"
                )
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The walk finds relative and absolute imports, so an upward one cannot hide."""
    fake = tmp_path / "guided_diffusion" / "base"
    fake.mkdir(parents=True)
    source = fake / "seeds.py"
    source.write_text(
        "from ..translation import jobs\n"
        "from ..io.rasters import Scaling\n"
        "def f():\n    from guided_diffusion.page import app\n"
    )
    known = {"translation.jobs": None, "io.rasters": None, "page.app": None}
    assert imports_of("base.seeds", source, known) == set(known)


def test_the_design_document_shows_each_module_in_its_layer():
    text = (ROOT / "docs" / "design.md").read_text()
    section = text[text.index("## Layers") :]
    section = section[: section.index("\n## ", 4)] if "\n## " in section[4:] else section
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\|\s*(\d)\s*\|\s*([\w-]+)\s*\|(.*)\|", line)
        if match:
            rows[int(match[1])] = (match[2], match[3])
    for name in modules():
        if not name:
            continue
        layer = layer_of(name)
        title, cell = rows.get(layer, ("", ""))
        assert title == LAYERS[layer][0], f"design.md lacks layer {layer} {LAYERS[layer][0]}"
        path = name.replace(".", "/")
        named = [path + ".py", path + "/", path.split("/")[0] + "/"]
        assert any(n in cell for n in named), (
            f"design.md's layer {layer} ({title}) does not name {path}.py"
        )
