"""JSON progress (quiet mode, logs): throttled to one line per interval, plus the first and the last."""

from __future__ import annotations

import json

from gradlake import progress


def lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().err.splitlines()]


def test_json_progress_is_throttled_and_ends_with_the_last_state(monkeypatch, capsys):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    monkeypatch.setenv("GRADLAKE_PROGRESS_SECONDS", "5")
    bar = progress.JsonProgress(total=1000, desc="train", unit="sample")
    for step in range(1000):  # one update per 20 ms for 20 s
        clock[0] += 0.02
        bar.set_postfix(step=step)
        bar.update(1)
    bar.close()
    out = lines(capsys)
    assert len(out) == 5 and out[0]["done"] == 1 and out[-1]["done"] == 1000
    gaps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(out[:-2], out[1:-1])]
    assert all(4.99 <= gap <= 5.03 for gap in gaps), gaps
    assert out[-1]["step"] == 999 and out[-1]["total"] == 1000


def test_close_prints_what_was_not_printed_yet(monkeypatch, capsys):
    monkeypatch.setattr(progress.time, "monotonic", lambda: 0.0)
    with progress.JsonProgress(total=None, desc="scan", unit="block", interval_s=60) as bar:
        for _ in range(7):
            bar.update(2)
    assert [line["done"] for line in lines(capsys)] == [2, 14]
    bar = progress.JsonProgress(total=3, desc="x", unit="it", interval_s=0)  # 0: every update
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert [line["done"] for line in lines(capsys)] == [1, 2, 3]
