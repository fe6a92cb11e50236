"""The repository stands alone and declares what it imports.

A user clones the repository and nothing else, and installs it with pip: every
third-party module the library and the scripts import must come from a declared
requirement, every declared requirement must be used, and no file may point to
something outside the repository.
"""

import ast
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("guided_diffusion", "scripts")


def _setup_keywords():
    """The literal keyword arguments of setup() in setup.py, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup"
    )
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def _setup_requirements():
    """install_requires and extras_require of setup.py."""
    found = _setup_keywords()
    return found["install_requires"], found.get("extras_require", {})


def _dist_name(requirement):
    name = re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules():
    modules = set()
    for folder in CODE_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names} - {
        "guided_diffusion"
    }


def test_every_import_is_declared_and_every_requirement_is_imported():
    required, extras = _setup_requirements()
    declared = {_dist_name(r) for r in required}
    optional = {_dist_name(r) for reqs in extras.values() for r in reqs}
    # The installed distributions say which one provides each module (PIL comes
    # from pillow, skimage from scikit-image): an independent mapping.
    providers = packages_distributions()
    used = set()
    for module in _imported_top_level_modules():
        dists = {_dist_name(d) for d in providers.get(module, [])}
        assert dists, f"{module} is imported but no installed distribution provides it"
        assert dists & (declared | optional), (
            f"{module} (from {sorted(dists)}) is imported but not declared in setup.py"
        )
        used |= dists
    unused = declared - used
    assert not unused, f"setup.py requires {sorted(unused)}, which nothing imports"


def test_every_package_folder_is_installed():
    # An editable install and a checkout import a subpackage that setup.py does
    # not list; a wheel, and so a user's plain `pip install .`, leaves it out.
    listed = set(_setup_keywords()["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "guided_diffusion").rglob("__init__.py")
    }
    assert on_disk <= listed, (
        f"setup.py's packages lacks {sorted(on_disk - listed)}: add them to the list"
    )
    assert listed <= on_disk, (
        f"setup.py lists {sorted(listed - on_disk)}, which have no __init__.py"
    )


def _tracked_text_files():
    try:
        listed = subprocess.run(
            ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        listed = None
    if listed is None or listed.returncode != 0:
        pytest.skip("the repository is not a git checkout (git ls-files failed)")
    for name in listed.stdout.splitlines():
        path = REPO / name
        if path.suffix in {".png", ".jpg", ".pt", ".npz", ".tif"} or not path.is_file():
            continue
        try:
            yield name, path.read_text()
        except UnicodeDecodeError:
            continue


# Pointers to files a clone does not have: the steering folder beside the
# repository, the design document kept there, and absolute paths of a machine.
# Each pattern is split with a character class ("[/]", "[.]") so that this file
# does not contain the very strings it looks for.
OUTSIDE = re.compile(
    "|".join(
        [
            r"[.][.][/]shared",
            r"parents\[2\]\s*/\s*\"shared\"",
            r"DESIGN[.]md",
            r"[/]work[/]",
            r"[/]tmp[/]",
            r"[/]root[/]",
            r"[/]home[/]\w+[/]",
            r"[/]Users[/]\w+[/]",
        ]
    )
)


def test_nothing_points_outside_the_repository():
    offenders = [
        f"{name}:{lineno}: {line.strip()}"
        for name, text in _tracked_text_files()
        for lineno, line in enumerate(text.splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not offenders, "files refer to paths outside the repository:\n" + "\n".join(
        offenders
    )
