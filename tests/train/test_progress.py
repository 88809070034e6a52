"""Tests for dpfed.train.progress."""

import io

import numpy as np

from dpfed.train.progress import Progress, format_duration, format_value


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _progress(total=500, **kwargs):
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress(
        total, desc="dpsgd", every_seconds=5.0, stream=stream, clock=clock, **kwargs
    )
    return progress, clock, stream


def _lines(stream):
    return stream.getvalue().splitlines()


def test_line_format():
    progress, clock, stream = _progress()
    clock.now = 37.5
    progress.update(120, eps=0.8312, loss=np.float32(0.41234))
    assert _lines(stream) == [
        "[dpsgd] 120/500 (24%) | eps 0.831 | loss 0.412 | 3.2 steps/s | ETA 1m59s"
    ], f"unexpected line {_lines(stream)}"


def test_prints_at_most_every_interval():
    progress, clock, stream = _progress()
    for step in range(1, 100):
        clock.now = step * 0.5  # 2 steps/s: a line every 10 steps.
        progress.update(step)
    printed = [int(line.split()[1].split("/")[0]) for line in _lines(stream)]
    assert printed == list(range(1, 100, 10)), f"lines printed at steps {printed}"


def test_final_step_always_prints_once():
    progress, clock, stream = _progress(total=10)
    clock.now = 1.0
    progress.update(9)
    clock.now = 1.1
    progress.update(10)
    progress.update(10)
    lines = _lines(stream)
    assert len(lines) == 2, f"expected the first and the final line, got {lines}"
    assert lines[-1].startswith("[dpsgd] 10/10 (100%)") and "took 1s" in lines[-1], lines[-1]


def test_resumed_run_rate_counts_only_this_process():
    progress, clock, stream = _progress(total=1000, start_step=900)
    clock.now = 10.0
    progress.update(950)
    assert "| 5 steps/s | ETA 10s" in _lines(stream)[0], (
        f"rate should be 50 steps / 10 s, not 950 / 10 s: {_lines(stream)}"
    )


def test_a_line_waits_for_the_steps_results_before_reading_the_clock():
    # Asynchronous dispatch: step 10 is queued at t = 5 s but its results are ready at
    # t = 20 s; a line that did not wait would report 2 steps/s instead of 0.5.
    waited = []

    def wait(results):
        waited.append(results)
        clock.now = 20.0

    progress, clock, stream = _progress(total=100, wait=wait)
    clock.now = 5.0
    progress.update(10, wait_for="step 10's state")
    assert waited == ["step 10's state"], f"the line did not wait for the results: {waited}"
    assert "| 0.5 steps/s |" in _lines(stream)[0], (
        f"the rate must count finished steps (10 in 20 s): {_lines(stream)}")


def test_no_wait_between_lines():
    waited = []
    progress, clock, _ = _progress(total=100, wait=waited.append)
    clock.now = 1.0
    progress.update(1, wait_for=1)
    clock.now = 2.0
    progress.update(2, wait_for=2)  # 1 s after the last line: none due
    assert waited == [1], f"waited for {waited}: dispatch between lines must stay async"


def test_no_rate_before_any_step_ran():
    progress, _, stream = _progress(start_step=100)
    progress.update(100, eps=1.0)
    assert _lines(stream) == ["[dpsgd] 100/500 (20%) | eps 1"], f"got {_lines(stream)}"


def test_none_fields_are_left_out():
    progress, _, stream = _progress()
    progress.update(0, eps=None, acc=0.5)
    assert _lines(stream) == ["[dpsgd] 0/500 (0%) | acc 0.5"], f"got {_lines(stream)}"


def test_no_desc_and_custom_unit():
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress(4, stream=stream, clock=clock, unit="rounds")
    clock.now = 2.0
    progress.update(2)
    assert _lines(stream) == ["2/4 (50%) | 1 rounds/s | ETA 2s"], f"got {_lines(stream)}"


def test_format_value_is_compact():
    cases = {
        0.83: "0.83",
        0.41234: "0.412",
        12.345: "12.3",
        1234.5: "1234",
        3: "3",
        1e-5: "1.00e-05",
        2.5e7: "2.50e+07",
        float("inf"): "inf",
        "cnn": "cnn",
        np.float32(0.5): "0.5",
        np.int64(7): "7",
    }
    got = {value: format_value(value) for value in cases}
    assert got == cases, f"format_value gave {got}"


def test_format_duration():
    cases = {45: "45s", 118: "1m58s", 7380: "2h03m", float("inf"): "?"}
    got = {seconds: format_duration(seconds) for seconds in cases}
    assert got == cases, f"format_duration gave {got}"


def test_the_rate_and_eta_leave_out_the_first_steps_compilation():
    # DP-SGD on digits, 400 steps: the first step (its compilation) took 15.7 s, the other
    # 399 steps 12 s; the first line read "0.0636 steps/s | ETA 1h44m", the second
    # (208 steps in 21 s) "9.89 steps/s | ETA 19s" for the 7 s the run had left.
    progress, clock, stream = _progress(total=400)
    clock.now = 15.7
    progress.update(1)
    clock.now = 21.0
    progress.update(208)
    clock.now = 28.0
    progress.update(400)
    first, middle, final = _lines(stream)
    assert first == "[dpsgd] 1/400 (0%) | first step took 16s", first
    assert "| 39.1 steps/s | ETA 5s" in middle, (
        f"207 steps in 5.3 s after the first: {middle}")
    assert final.endswith("| 32.4 steps/s | took 28s"), final  # 399 steps in 12.3 s
