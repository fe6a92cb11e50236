"""
The README and the documentation site (docs/, mkdocs.yml).

* The site builds with `mkdocs build --strict` (a broken link or anchor fails).
* Every command block marked `<!-- runs-in-test -->` (on the line before the
  block) in the README or docs/ runs here, in a fresh folder, and exits 0; blocks
  that take minutes stay unmarked.
* Every `--flag` the pages name is one a script accepts (or, listed below, one of
  another tool's); every `python scripts/X.py ...` command in a code block gives X
  only flags X's parser has.
* The README stays a landing page: at most 12 KB, the quick start (the demo and the
  test command) in its first 40 lines, and every link into docs/ resolves.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
README = os.path.join(ROOT, "README.md")
MARK = "<!-- runs-in-test -->"

# flags the pages name that belong to other tools than the scripts and benchmarks
OTHER_TOOLS = {
    "--nproc_per_node": "torchrun",
    "--max-children": "mutmut (docs/contributing.md)",
    "--flag": "the placeholder in `--flag True`",
    "--no-deps": "pip (benchmarks/README.md)",
}


def pages():
    """:return: {path relative to the root: text} of the README and docs/*.md."""
    paths = [README] + sorted(
        os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md")
    )
    out = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            out[os.path.relpath(path, ROOT)] = f.read()
    # the benchmarks page includes this file (pymdownx.snippets)
    with open(os.path.join(ROOT, "benchmarks", "README.md"), encoding="utf-8") as f:
        out["benchmarks/README.md"] = f.read()
    return out


def code_blocks(text):
    """
    The fenced code blocks of a Markdown text.

    :param text: Markdown.
    :return: a list of (marked, body): marked when MARK is the line before the fence.
    """
    blocks = []
    for m in re.finditer(r"(?ms)^```[a-z]*\n(.*?)^```", text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        blocks.append((before.strip() == MARK, m.group(1)))
    return blocks


def commands(body):
    """:return: the shell commands of a block, continuation lines joined."""
    return [c.strip() for c in body.replace("\\\n", " ").split("\n") if c.strip()]


def load_hook():
    """:return: docs/hooks/flags.py as a module (it reads the scripts' parsers)."""
    spec = importlib.util.spec_from_file_location(
        "docs_hook_flags", os.path.join(DOCS, "hooks", "flags.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script_flags():
    """{script file name: its option strings}, read from create_argparser()."""
    hook = load_hook()
    out = {}
    for path in hook.script_paths():
        parser = hook.load_parser(path)
        out[os.path.basename(path)] = {
            s for action in parser._actions for s in action.option_strings
        }
    return out


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the [docs] extra is not installed")
    pytest.importorskip("material", reason="the [docs] extra is not installed")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q"]
        + ["-f", "mkdocs.yml", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    reference = tmp_path / "site" / "reference" / "flags" / "index.html"
    html = reference.read_text(encoding="utf-8")
    # generated: a flag of every script, and the group the settings declare
    assert "--timestep_respacing" in html and "--spread_bins" in html
    assert "diffusion" in html


def test_marked_commands_run(tmp_path):
    marked = [
        (page, body)
        for page, text in pages().items()
        for is_marked, body in code_blocks(text)
        if is_marked
    ]
    assert marked, f"no block marked {MARK} in the README or docs/"
    # the commands name scripts/ from the repository root; run them elsewhere
    os.symlink(os.path.join(ROOT, "scripts"), tmp_path / "scripts")
    # the checkout's guided_diffusion, as the scripts import it from their parent folder
    env = dict(os.environ, OPENAI_LOGDIR=str(tmp_path / "logs"), PYTHONPATH=ROOT)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    every = [(page, command) for page, body in marked for command in commands(body)]
    # a --help changes nothing: those run side by side, the others in their order
    helps = [
        (page, command, subprocess.Popen(
            ["bash", "-c", command], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True,
        ))
        for page, command in every if command.rstrip().endswith("--help")
    ]  # fmt: skip
    for page, command in every:
        if command.rstrip().endswith("--help"):
            continue
        run = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
            text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, f"{page}: {command}\n{run.stderr[-2000:]}"
    for page, command, proc in helps:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"{page}: {command}\n{err[-2000:]}"


def test_flags_named_exist(script_flags):
    known = set().union(*script_flags.values())
    bench = ""
    for name in sorted(os.listdir(os.path.join(ROOT, "benchmarks"))):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "benchmarks", name), encoding="utf-8") as f:
                bench += f.read()
    unknown = []
    for page, text in pages().items():
        for flag in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", text))):
            if flag in known or flag in OTHER_TOOLS or f'"{flag}"' in bench:
                continue
            unknown.append(f"{page}: {flag}")
        # a script's command gives that script's flags only
        for _, body in code_blocks(text):
            for command in commands(body):
                m = re.search(r"python (?:-\S+ )*scripts/(\w+\.py)(.*)", command)
                if not m:
                    continue
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", m.group(2)):
                    if flag not in script_flags[m.group(1)]:
                        unknown.append(f"{page}: {m.group(1)} {flag}")
    assert not unknown, "flags no script accepts:\n" + "\n".join(unknown)


def test_readme_is_a_landing_page():
    size = os.path.getsize(README)
    assert size <= 12 * 1024, f"README.md is {size} bytes; move text into docs/"
    with open(README, encoding="utf-8") as f:
        text = f.read()
    first_screen = "\n".join(text.split("\n")[:40])
    assert (
        "pip install torch==2.13.0 && pip install -e . && bash demo.sh" in first_screen
    )
    assert "python -m pytest -q" in first_screen
    links = re.findall(r"\]\(((?:docs|benchmarks|assets)/[^)#\s]+)(?:#[^)]*)?\)", text)
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if not os.path.exists(os.path.join(ROOT, link))]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_code_blocks_found():
    # the block parser the tests above rely on, on a text whose blocks are known
    text = (
        f"a\n\n{MARK}\n```sh\npython x.py \\\n    --a 1\necho b\n```\n\n```\nc\n```\n"
    )
    assert code_blocks(text) == [
        (True, "python x.py \\\n    --a 1\necho b\n"),
        (False, "c\n"),
    ]
    assert commands(code_blocks(text)[0][1]) == ["python x.py      --a 1", "echo b"]
