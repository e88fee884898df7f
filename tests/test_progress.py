"""minilora.progress.Metrics: metrics.jsonl survives a torn last line and holds one final record per run."""

import json

from minilora.progress import Metrics, read_metrics


def test_torn_and_foreign_lines_are_dropped_complete_records_kept(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    good = [{"step": 0, "val_loss": 5.0}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '[1, 2]\n{"step": 3, "loss": 3.', encoding="utf-8")
    assert read_metrics(path) == good
    assert "dropped 2 incomplete line(s) (line 4, 5)" in capsys.readouterr().out
    metrics = Metrics(tmp_path, resume_step=2)
    assert metrics.records == good
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in good)  # rewritten whole: appends start clean
    metrics.log({"step": 3, "loss": 3.0})
    assert read_metrics(path)[-1] == {"step": 3, "loss": 3.0}


def test_log_final_replaces_the_final_record_of_a_finished_run(tmp_path):
    metrics = Metrics(tmp_path, resume_step=None)
    for record in ({"step": 0, "val_loss": 5.0}, {"step": 2, "loss": 3.0}, {"step": 2, "val_loss": 3.1}):
        metrics.log(record)
    resumed = Metrics(tmp_path, resume_step=2)  # resuming the finished run: its final record is kept ...
    resumed.log_final({"step": 2, "val_loss": 3.1})  # ... and the new one replaces it, not follows it
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 0, "val_loss": 5.0}, {"step": 2, "loss": 3.0},
                                                       {"step": 2, "val_loss": 3.1}]
    (tmp_path / "b").mkdir()
    fresh = Metrics(tmp_path / "b", resume_step=None)
    fresh.log_final({"step": 4, "val_loss": 2.0})  # no earlier final record: appended
    assert read_metrics(tmp_path / "b" / "metrics.jsonl") == [{"step": 4, "val_loss": 2.0}]
