"""Build the lessons site: run every notebook, then render the executed notebooks to static pages.

    python scripts/build_lessons.py                  # run notebooks/*.ipynb, build build/lessons/site
    python scripts/build_lessons.py --no-execute     # render the executed copies already in build/lessons
    python scripts/build_lessons.py 01 03            # only the notebooks whose names start so

Each notebook runs in a fresh Jupyter kernel through nbclient, from the ``notebooks/`` folder,
with ``MODKIT_PORTS=auto`` unless set (so the build runs beside a serving pipeline); the
executed copy, outputs and figures included, goes to ``build/lessons/docs/``, with the time
each took in ``build/lessons/timings.json``. Then MkDocs (the Material theme, with
mkdocs-jupyter rendering the notebooks as they are, without running them again) writes one
page per lesson to ``build/lessons/site/``; open ``site/index.html`` in a browser, or serve it
with ``python -m http.server -d build/lessons/site``. The pages load nothing from the network.

A notebook that fails stops the build with the cell and its error. ``tests/test_lessons.py``
runs the same functions, then checks every page in headless Chromium.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
BUILD = REPO / "build" / "lessons"
CELL_TIMEOUT_S = 600


def lesson_paths(prefixes: list[str] | None = None) -> list[Path]:
    """``notebooks/NN_*.ipynb`` in lesson order, or those whose names start with one of ``prefixes``."""
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        paths = [p for p in paths if p.name.startswith(tuple(prefixes))]
        if not paths:
            raise SystemExit(f"build_lessons: no notebook starts with {' or '.join(prefixes)}")
    return paths


def execute(path: Path, timeout_s: int = CELL_TIMEOUT_S) -> tuple[Any, float]:
    """Run the notebook at ``path`` in a fresh kernel, as a learner's Jupyter would; returns it with
    its outputs, and the seconds it took. A failing cell raises ``nbclient``'s CellExecutionError."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    return notebook, run_in_kernel(notebook, path.parent, timeout_s)


def run_in_kernel(notebook: Any, folder: Path, timeout_s: int = CELL_TIMEOUT_S) -> float:
    """Run ``notebook`` (read by nbformat) in a fresh kernel started in ``folder``, filling in its
    outputs; returns the seconds it took. A failing cell raises ``nbclient``'s CellExecutionError,
    with the outputs of the cells that ran, the failing one's error included, left in ``notebook``."""
    import nbclient

    os.environ.setdefault("MODKIT_PORTS", "auto")  # the kernel inherits this process's environment
    client = nbclient.NotebookClient(
        notebook, timeout=timeout_s, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )
    t0 = time.perf_counter()
    client.execute()
    return time.perf_counter() - t0


def execute_all(paths: list[Path], docs: Path, say: Any = print) -> dict[str, float]:
    """Execute each notebook into ``docs/<name>``; returns seconds per notebook name."""
    import nbformat

    docs.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    for path in paths:
        say(f"running {path.name} ...")
        notebook, seconds = execute(path)
        nbformat.write(notebook, docs / path.name)
        timings[path.name] = round(seconds, 1)
        say(f"  {seconds:.1f} s")
    return timings


def write_site_config(build: Path, pages: list[Path]) -> Path:
    """``build/mkdocs.yml`` and ``build/docs/index.md`` for ``pages`` (executed notebooks in ``build/docs``)."""
    index = ["# modkit lessons", "", _intro(), "", "| lesson | what you see happen |", "| --- | --- |"]
    blurbs = _blurbs()
    for page in pages:
        index.append(f"| [{_title(page)}]({page.name}) | {blurbs.get(page.stem, '')} |")
    (build / "docs" / "index.md").write_text("\n".join(index) + "\n")
    # The theme's column is narrow for a dashboard 16 inches wide: let pages use a wide screen.
    (build / "docs" / "wide.css").write_text(".md-grid { max-width: 96rem; }\n")
    config = {
        "site_name": "modkit lessons",
        "docs_dir": "docs",
        "site_dir": "site",
        "use_directory_urls": False,  # pages open from the file system too
        # Fonts from the theme's own files: the pages load nothing from the network.
        "theme": {"name": "material", "font": False},
        "extra_css": ["wide.css"],
        "nav": [{"Lessons": "index.md"}, *({_title(p): p.name} for p in pages)],
        "plugins": [
            {
                "mkdocs-jupyter": {
                    "execute": False,  # the notebooks ran already, in build/docs
                    "include_source": True,
                    "ignore_h1_titles": True,
                    "no_input": False,
                }
            }
        ],
    }
    path = build / "mkdocs.yml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def build_site(build: Path, pages: list[Path]) -> Path:
    """Render the executed notebooks in ``build/docs`` with MkDocs; returns the site's folder."""
    config = write_site_config(build, pages)
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(config)],
        cwd=build,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"mkdocs build failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return build / "site"


def _title(page: Path) -> str:
    """The notebook's first heading, e.g. "01 · The paged KV cache"."""
    notebook = json.loads(page.read_text())
    for cell in notebook["cells"]:
        if cell["cell_type"] == "markdown":
            first = "".join(cell["source"]).strip().splitlines()[0]
            return first.lstrip("# ").strip()
    return page.stem


def _intro() -> str:
    return (
        "Each lesson is a Jupyter notebook that launches modkit's six processes on the embedded "
        "tiny model and watches them work. These pages are the notebooks as they ran, figures "
        "included; to run them yourself: `jupyter lab notebooks/`."
    )


def _blurbs() -> dict[str, str]:
    """Each lesson's one-line summary, from README.md's table of notebooks."""
    blurbs: dict[str, str] = {}
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`") and cells[0][1:3].isdigit():
            blurbs[cells[0].strip("`")] = cells[1]
    return blurbs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefixes", nargs="*", help="only notebooks whose names start so (01, 05_routing ...)")
    parser.add_argument("--no-execute", action="store_true", help="render the executed copies already built")
    parser.add_argument("--out", type=Path, default=BUILD, help=f"the build folder (default {BUILD.relative_to(REPO)})")
    options = parser.parse_args(argv)
    docs = options.out / "docs"
    paths = lesson_paths(options.prefixes)
    if not options.no_execute:
        timings = execute_all(paths, docs)
        (options.out / "timings.json").write_text(json.dumps(timings, indent=2))
        print(f"{len(timings)} notebooks in {sum(timings.values()):.0f} s")
    pages = [docs / p.name for p in paths if (docs / p.name).is_file()]
    if not pages:
        print(f"build_lessons: no executed notebooks in {docs}; run without --no-execute", file=sys.stderr)
        return 1
    site = build_site(options.out, pages)
    print(f"site: {site / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
