"""metrics.jsonl: records, truncation on resume, and a line cut short by a kill."""

import json

from yunque.modeldir import read_metrics
from yunque.train.logger import TrainLog


def test_a_cut_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 10, "loss": 2.0}) + "\n" + '{"step": 20, "lo')
    assert read_metrics(path) == [{"step": 10, "loss": 2.0}]
    assert read_metrics(tmp_path / "none.jsonl") == []


def test_resume_keeps_the_records_up_to_its_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0, "elapsed": s / 10}) + "\n" for s in (10, 20, 30)))
    log = TrainLog(tmp_path, resume_step=20, total=40, progress=False)
    assert [r["step"] for r in read_metrics(path)] == [10, 20] and log.elapsed == 2.0
    log.write({"step": 30, "loss": 0.5, "val_loss": 0.7})
    assert log.loss == 0.5 and log.val_loss == 0.7 and log.first_loss == 1.0
    log.close(tmp_path)
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_only_the_main_process_writes(tmp_path):
    log = TrainLog(tmp_path, resume_step=None, total=10, progress=False, enabled=False)
    log.write({"step": 1, "loss": 1.0})
    log.close(tmp_path)
    assert list(tmp_path.iterdir()) == []
