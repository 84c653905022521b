"""The lessons as a learner meets them: each notebook run in a fresh Jupyter kernel by nbclient,
its figures checked, then the lessons site built from the executed notebooks and every page
opened in headless Chromium.

nbval (README's test command) checks that every cell runs; it does not look at what a cell
shows. These tests do: a cell that calls ``viz.`` must show an image, no output may be a
figure's bare text repr (``<Figure size 1000x350 with 1 Axes>``, what a kernel shows when no
PNG formatter is registered), and no cell may show the same image twice.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # each notebook launches the six-process pipeline in a kernel

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("build_lessons", REPO / "scripts" / "build_lessons.py")
assert _spec is not None and _spec.loader is not None
build_lessons = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_lessons)

LESSONS = build_lessons.lesson_paths()
FIGURE_REPR = "<Figure size"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Notebook name -> its executed copy; filled by ``test_notebook_shows_its_figures``."""
    return {}


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = tmp_path_factory.mktemp("lessons")
    (build / "docs").mkdir()
    return build


def image_outputs(cell: Any) -> list[str]:
    return [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]


def figure_problems(notebook: Any) -> list[str]:
    """What a learner would see wrong in the executed notebook: each problem names its cell."""
    problems = []
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        where = f"cell {i} ({cell.source.splitlines()[0][:60]!r})" if cell.source else f"cell {i}"
        images = image_outputs(cell)
        if "viz." in cell.source and not images:
            problems.append(f"{where} calls viz. but shows no image/png")
        digests = [hashlib.sha256(base64.b64decode(png)).hexdigest() for png in images]
        if len(set(digests)) < len(digests):
            problems.append(f"{where} shows the same figure twice")
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            text = data.get("text/plain", "")
            if text.startswith(FIGURE_REPR) and "image/png" not in data:
                problems.append(f"{where} shows a figure as text: {text[:60]!r}")
            if output.get("output_type") == "error":
                problems.append(f"{where} raised {output.get('ename')}: {output.get('evalue')}")
    return problems


def test_every_lesson_ends_with_try_it() -> None:
    import nbformat

    assert len(LESSONS) >= 9, [p.name for p in LESSONS]
    for path in LESSONS:
        notebook = nbformat.read(path, as_version=4)
        headings = [line for c in notebook.cells if c.cell_type == "markdown" for line in c.source.splitlines()]
        sections = [h for h in headings if h.startswith("## ")]
        assert sections and sections[-1].startswith("## Try it"), f"{path.name}: last section is {sections[-1:]}"
        assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code"), (
            f"{path.name} is committed with outputs"
        )


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", LESSONS, ids=[p.stem for p in LESSONS])
def test_notebook_shows_its_figures(path: Path, executed: dict[str, Path], build_dir: Path) -> None:
    import nbformat

    notebook, seconds = build_lessons.execute(path)
    print(f"{path.name}: {seconds:.1f} s")
    problems = figure_problems(notebook)
    assert not problems, "\n".join(problems)
    copy = build_dir / "docs" / path.name
    nbformat.write(notebook, copy)
    executed[path.name] = copy


def test_figure_checks_catch_what_the_learner_met() -> None:
    """The checks above fail on the outputs that notebooks 02 and 03 used to show."""
    import nbformat

    notebook = nbformat.v4.new_notebook()
    text_only = nbformat.v4.new_output(
        "execute_result", {"text/plain": "<Figure size 1000x350 with 1 Axes>"}, execution_count=1
    )
    png = base64.b64encode(b"\x89PNG not really").decode()
    twice = [nbformat.v4.new_output("display_data", {"image/png": png, "text/plain": "<Figure>"}) for _ in range(2)]
    notebook.cells = [
        nbformat.v4.new_code_cell("viz.timeline(trace)", outputs=[text_only]),
        nbformat.v4.new_code_cell("fig", outputs=twice),
        nbformat.v4.new_code_cell("viz.kv_usage(trace)", outputs=twice[:1]),
    ]
    problems = figure_problems(notebook)
    assert len(problems) == 3, problems
    assert "cell 0" in problems[0] and "no image/png" in problems[0]
    assert "cell 0" in problems[1] and "as text" in problems[1]
    assert "cell 1" in problems[2] and "twice" in problems[2]


@pytest.mark.timeout(900)
def test_lessons_site_shows_every_figure_in_chromium(executed: dict[str, Path], build_dir: Path) -> None:
    """Build the site from the executed notebooks, open each page in headless Chromium, and check
    that every figure loaded with a non-zero size and that no page shows an error."""
    import nbformat

    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    for path in LESSONS:  # run alone, this test executes the notebooks itself
        if path.name not in executed:
            notebook, _ = build_lessons.execute(path)
            nbformat.write(notebook, build_dir / "docs" / path.name)
            executed[path.name] = build_dir / "docs" / path.name
    pages = [executed[p.name] for p in LESSONS]
    site = build_lessons.build_site(build_dir, pages)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1400,1000")
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.get((site / "index.html").as_uri())
        links = browser.execute_script("return Array.from(document.querySelectorAll('article a')).map(a => a.href)")
        for page in pages:
            assert any(link.endswith(page.with_suffix(".html").name) for link in links), f"index has no {page.name}"
        for page in pages:
            notebook = nbformat.read(page, as_version=4)
            expected = sum(len(image_outputs(c)) for c in notebook.cells if c.cell_type == "code")
            browser.get((site / page.with_suffix(".html").name).as_uri())
            browser.execute_script("return document.fonts.ready")
            images = browser.execute_script(
                "return Array.from(document.querySelectorAll('article img')).map(i => ({src: i.src.slice(0, 30),"
                " complete: i.complete, natural: i.naturalWidth, width: i.getBoundingClientRect().width,"
                " height: i.getBoundingClientRect().height}))"
            )
            figures = [i for i in images if i["src"].startswith("data:image/png")]
            assert len(figures) >= expected > 0 or expected == 0, f"{page.name}: {len(figures)} of {expected} figures"
            broken = [i for i in figures if not (i["complete"] and i["natural"] > 0 and i["width"] > 0 < i["height"])]
            assert not broken, f"{page.name}: figures not shown: {broken}"
            text = browser.execute_script("return document.querySelector('article').innerText")
            assert "Traceback (most recent call last)" not in text, f"{page.name} shows an error"
            errors = browser.execute_script(
                "return document.querySelectorAll('.jp-OutputArea-output[data-mime-type*=\"error\"]').length"
            )
            assert errors == 0, f"{page.name} shows {errors} error outputs"
    finally:
        browser.quit()
