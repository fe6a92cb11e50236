"""
MkDocs hook: the flag reference (reference/flags.md), generated at build time.

Every script in scripts/ has create_argparser(); this hook imports each script
file, reads its parser and writes one section per script: each flag with its
default, choices, help and the settings group that declares it
(guided_diffusion's settings.SETTINGS), so the reference cannot drift from the
code. A script without create_argparser() stops the build with one line.
"""

import argparse
import importlib.util
import os
import sys

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "scripts")
PAGE = "reference/flags.md"

INTRO = """# Flag reference

Generated from each script's `create_argparser()` when the site is built, so
it shows what the code accepts. Booleans are given as `--flag True` or
`--flag False`; every script prints the same with `--help`. The group is the
settings group of `guided_diffusion/base/settings.py` that declares the flag (the
flags of a run's `config.json` come from the same declarations); a flag
without a group is the script's own.

The shell scripts `train.sh` and `sample.sh` run the paper's settings (paths
and `NUM_GPUS` at the top or from the environment); `demo.sh` takes its
settings from the environment (`--update_assets` refreshes `assets/demo.png`,
and with `DATA_FORMAT=sen12ms` the bundled scene model in `assets/scene_model/`).
"""


def load_parser(path):
    """
    Import one script file and return its create_argparser()'s parser.

    :param path: the script's path.
    :return: the argparse parser.
    """
    name = "docs_flags_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if ROOT not in sys.path:  # the scripts import guided_diffusion from the checkout
        sys.path.insert(0, ROOT)
    spec.loader.exec_module(module)
    if not hasattr(module, "create_argparser"):
        raise PluginError(
            f"scripts/{os.path.basename(path)} has no create_argparser(); add one "
            "returning its parser, so the flag reference can list its flags"
        )
    return module.create_argparser()


def script_paths():
    """:return: the paths of the scripts in scripts/, sorted."""
    return sorted(
        os.path.join(SCRIPTS, f) for f in os.listdir(SCRIPTS) if f.endswith(".py")
    )


def cell(text):
    """:return: text fit for one cell of a Markdown table."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def flag_rows(parser):
    """
    The rows of one parser's table.

    :param parser: an argparse parser.
    :return: a list of (flags, default, choices, group, help) strings.
    """
    from guided_diffusion.base import (
        settings,  # the one place the hook names the module
    )

    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        if action.help == argparse.SUPPRESS:
            continue
        flags = ", ".join(f"`{s}`" for s in action.option_strings)
        if isinstance(action, argparse._StoreTrueAction):
            default = "off"
        elif action.default in (None, ""):
            default = ""
        else:
            default = f"`{action.default}`"
        choices = ", ".join(
            f"`{c}`" if c != "" else '`""`' for c in action.choices or ()
        )
        declared = settings.SETTINGS.get(action.dest)
        group = declared.group if declared is not None else ""
        help_text = formatter._expand_help(action) if action.help else ""
        # a help computed from this checkout's location shows the path from its root
        help_text = help_text.replace(ROOT + os.sep, "")
        rows.append((flags, default, choices, group, help_text))
    return rows


def render():
    """:return: the reference page's Markdown."""
    parts = [INTRO]
    for path in script_paths():
        parser = load_parser(path)
        name = os.path.basename(path)
        summary = (parser.description or "").strip().split("\n\n")[0]
        parts.append(f"\n## {name}\n")
        if summary:
            parts.append(" ".join(summary.split()) + "\n")
        parts.append("\n| flag | default | choices | group | help |")
        parts.append("|---|---|---|---|---|")
        for row in flag_rows(parser):
            parts.append("| " + " | ".join(cell(c) for c in row) + " |")
    return "\n".join(parts) + "\n"


def on_files(files, config):
    """Add the generated reference page to the site."""
    files.append(File.generated(config, PAGE, content=render()))
    return files
