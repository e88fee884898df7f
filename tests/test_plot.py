"""The loss chart, read back as XML: legend outside the plotting area, a title naming run, mode and method,
tick labels at both ends of each y-axis, and a second panel with the learning rate."""

import xml.etree.ElementTree as ET

import pytest

from minilora.plot import line_chart, panel_chart
from minilora.progress import Metrics

NS = {"s": "http://www.w3.org/2000/svg"}


def parse(path):
    return ET.parse(path).getroot()


def panels(root):
    return root.findall(".//s:g[@class='panel']", NS)


def area(panel) -> tuple[float, float, float, float]:
    r = panel.find("s:rect[@class='plot-area']", NS)
    return tuple(float(r.get(k)) for k in ("x", "y", "width", "height"))


def y_ticks(panel) -> list[tuple[float, float]]:
    """(label value, pixel y) of each y tick."""
    return [(float(t.text), float(t.get("data-y"))) for t in panel.findall("s:g[@class='y-ticks']/s:text", NS)]


def polyline_ys(panel, name) -> list[float]:
    line = panel.find(f"s:polyline[@data-series='{name}']", NS)
    return [float(p.split(",")[1]) for p in line.get("points").split()]


def test_training_chart_from_metrics(tmp_path):
    """What the trainer draws: a warm-up + cosine lr, a falling train loss, sparser validation points."""
    metrics = Metrics(tmp_path, None, title="my-run: sft fine-tuning, qlora")
    lrs = [2e-4 * min(1, (s + 1) / 4) for s in range(20)]
    for step in range(1, 21):
        record = {"step": step, "loss": 3.0 - 0.08 * step, "lr": lrs[step - 1]}
        if step % 5 == 0:
            record["val_loss"] = 2.9 - 0.05 * step
        metrics.log(record)
    root = parse(metrics.plot())

    title = root.find("s:text[@class='title']", NS).text
    assert title == "my-run: sft fine-tuning, qlora"
    loss_panel, lr_panel = panels(root)
    assert lr_panel.find("s:text[@class='ylabel']", NS).text == "learning rate"
    assert len(polyline_ys(lr_panel, "learning rate")) == 20

    # Legend: right of every plotting area, so it covers no data.
    right_edge = max(x + w for x, _, w, _ in map(area, panels(root)))
    legend = root.find("s:g[@class='legend']", NS)
    names = [t.text for t in legend.findall("s:text", NS)]
    assert names == ["train loss", "validation loss", "learning rate"]
    assert all(float(t.get("x")) > right_edge for t in legend.findall("s:text", NS))
    assert float(root.get("width")) >= max(float(t.get("x")) + 7 * len(t.text) for t in legend.findall("s:text", NS))

    # Ticks at both ends of each y-axis: the first and last labels sit on the frame's bottom and top edges and
    # enclose the data (loss 1.4 ... 2.92, lr 5e-5 ... 2e-4).
    for panel, (lo, hi) in ((loss_panel, (1.4, 2.92)), (lr_panel, (5e-5, 2e-4))):
        _, top, _, height = area(panel)
        ticks = y_ticks(panel)
        (v_bottom, y_bottom), (v_top, y_top) = ticks[0], ticks[-1]
        assert y_bottom == pytest.approx(top + height, abs=0.06) and y_top == pytest.approx(top, abs=0.06)
        assert v_bottom <= lo and v_top >= hi and len(ticks) >= 3
        values = [v for v, _ in ticks]
        steps = {round(b - a, 12) for a, b in zip(values, values[1:])}
        assert len(steps) == 1  # evenly spaced round values
    # Every data point lies inside its frame.
    for panel, name in ((loss_panel, "train loss"), (loss_panel, "validation loss"), (lr_panel, "learning rate")):
        _, top, _, height = area(panel)
        assert all(top <= y <= top + height for y in polyline_ys(panel, name))


def test_single_panel_line_chart_keeps_its_interface(tmp_path):
    root = parse(line_chart({"a": [(1, 0.5), (2, 0.25)], "b": [(1, 0.4)]}, tmp_path / "c.svg", title="t",
                            ylabel="GiB"))
    (panel,) = panels(root)
    assert panel.find("s:text[@class='ylabel']", NS).text == "GiB"
    ticks = y_ticks(panel)
    assert ticks[0][0] <= 0.25 and ticks[-1][0] >= 0.5


def test_log_axis_and_empty_series(tmp_path):
    root = parse(panel_chart([({"loss": [(0, 100.0), (10, 0.1)]}, "loss", True), ({"lr": []}, "lr", False)],
                             tmp_path / "c.svg"))
    loss_panel, _ = panels(root)
    ticks = y_ticks(loss_panel)
    assert ticks[0][0] <= 0.1 and ticks[-1][0] >= 100.0
