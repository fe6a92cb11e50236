"""
MkDocs hook: files of the repository outside docs/ that the pages show or link.

The pictures in assets/ and the benchmark results (benchmarks/RESULTS.md) live
where the code and the tests write them; this hook adds them to the site under
the same paths, so the pages link them without a copy that could fall behind.
"""

import glob
import os

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATTERNS = ("assets/*.png", "benchmarks/RESULTS.md")


def on_files(files, config):
    """Add the repository's pictures and benchmark results to the site."""
    for pattern in PATTERNS:
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            uri = os.path.relpath(path, ROOT).replace(os.sep, "/")
            files.append(File.generated(config, uri, abs_src_path=path))
    return files
