"""metrics_writer: TFRecord/Event encoding (decoded by TensorBoard, independent of our encoder),
metrics.jsonl and its truncation on resume."""
import json

from events_reader import events, tensorboard_view

from t5x_lite.training import metrics_writer as mw


def test_crc32c_known_value():
    assert mw.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_event_file_decodes(tmp_path):
    writer = mw.MetricsWriter(tmp_path, start_step=0, total_steps=10)
    writer.write(5, {"loss": 2.5, "learning_rate": 0.01})
    writer.write(10, {"loss": 1.25, "accuracy": 0.5}, prefix="eval/")
    writer.close()
    files = list((tmp_path / mw.EVENTS_DIR).iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents.")
    read = events(files[0])
    assert read[0].file_version == "brain.Event:2"
    got = {(e.step, v.tag): v.simple_value for e in read[1:] for v in e.summary.value}
    assert got == {(5, "loss"): 2.5, (5, "learning_rate"): 0.009999999776482582,
                   (10, "eval/loss"): 1.25, (10, "eval/accuracy"): 0.5}
    lines = [json.loads(x) for x in (tmp_path / mw.METRICS_FILE).read_text().splitlines()]
    assert lines == [{"step": 5, "loss": 2.5, "learning_rate": 0.01},
                     {"step": 10, "eval/loss": 1.25, "eval/accuracy": 0.5}]


def test_resume_truncates_jsonl_and_marks_session_start(tmp_path):
    w = mw.MetricsWriter(tmp_path)
    for step in (10, 20, 30):
        w.write(step, {"loss": float(step)})
    w.close()
    with open(tmp_path / mw.METRICS_FILE, "a") as f:
        f.write('{"step": 40, "lo')  # a line cut short by kill -9
    w = mw.MetricsWriter(tmp_path, start_step=20)  # resumed from checkpoint 20
    w.write(30, {"loss": 3.0})
    w.close()
    assert [(r["step"], r["loss"]) for r in mw.read_jsonl(tmp_path / mw.METRICS_FILE)] == [
        (10, 10.0), (20, 20.0), (30, 3.0)]
    # What TensorBoard shows equals metrics.jsonl: the resumed run's restart marker purges the
    # killed run's step 30, and keeps step 20 (its checkpoint step; it once purged that too).
    for first_start_counts in (False, True):
        assert tensorboard_view(tmp_path / mw.EVENTS_DIR, first_start_counts) == [
            (10, "loss", 10.0), (20, "loss", 20.0), (30, "loss", 3.0)]


def test_non_main_process_writes_nothing(tmp_path):
    w = mw.MetricsWriter(tmp_path / "x", is_main=False)
    w.write(1, {"loss": float("nan")})
    w.close()
    assert not (tmp_path / "x").exists()


def test_console_line_has_eta():
    w = mw.MetricsWriter("/unused", is_main=False, start_step=0, total_steps=100)
    line = w.console_line(50, {"loss": 1.5, "tokens_per_s": 1234.0})
    assert line.startswith("step 50/100  loss=1.5  tokens_per_s=1234  eta ")


def test_eta_leaves_out_compilation(monkeypatch):
    """10 s per step after a 100 s compilation: the ETA says 10 s per remaining step (it said
    20 s after the first 10 steps: the compilation spread over them)."""
    clock = [1000.0]
    monkeypatch.setattr(mw.time, "time", lambda: clock[0])
    w = mw.MetricsWriter("/unused", is_main=False, start_step=0, total_steps=100)
    clock[0] += 100 + 10 * 10  # compile, then 10 steps
    assert w.console_line(10, {"loss": 1.0, "step_time": 10.0}).endswith("eta 15m00s")
    clock[0] += 10 * 10
    assert w.console_line(20, {"loss": 1.0, "step_time": 10.0}).endswith("eta 13m20s")
    clock[0] += 30  # an eval at step 20: evals are part of what is left too (13 s per step)
    assert w.console_line(20, {"eval/loss": 1.0}).endswith("eta 17m20s")
