"""benchkit's CPU steal reading: what every speed report adds about the
machine's other guests (no TensorFlow here)."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import benchkit  # noqa: E402

STAT = ("cpu  5850432 127953 502418 4686793 13969 0 4561 103699 0 0\n"
        "cpu0 2925216 63976 251209 2343396 6984 0 2280 51849 0 0\n")


def test_cpu_times_reads_steal_and_the_total_of_the_summary_line():
    steal, total = benchkit.cpu_times(STAT)
    assert steal == 103699
    assert total == 5850432 + 127953 + 502418 + 4686793 + 13969 + 0 + 4561 + 103699


@pytest.mark.parametrize("text", [
    "", "cpu0 1 2 3 4 5 6 7 8\n", "cpu 1 2 3 4 5 6 7\n", "cpu 1 2 3 x 5 6 7 8\n",
    "cpu 1 2 3 \u0664 5 6 7 8\n",  # a non-ASCII digit
])
def test_cpu_times_refuses_what_is_not_the_summary_line(text):
    assert benchkit.cpu_times(text) is None


def test_steal_share_is_the_stolen_part_of_the_elapsed_cpu_time():
    assert benchkit.steal_share((100, 1000), (150, 2000)) == pytest.approx(0.05)
    assert benchkit.steal_share(None, (150, 2000)) is None
    assert benchkit.steal_share((100, 1000), (100, 1000)) is None


def test_write_report_adds_the_steal_share(tmp_path, monkeypatch):
    # A script that never imported the selection op gets no line about it.
    monkeypatch.delitem(sys.modules, "keras_freetickets.native", raising=False)
    monkeypatch.setattr(benchkit, "_START_CPU_TIMES", (10, 1000))
    monkeypatch.setattr(benchkit, "read_cpu_times", lambda: (40, 1600))
    benchkit.write_report(tmp_path, "x", {"a": 1}, "# X\n", echo=False)
    assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1, "cpu_steal_share": 0.05}
    assert (tmp_path / "x.md").read_text().endswith(
        "\n\n- CPU steal since the script started (time the hypervisor gave "
        "other guests): 5.0%.\n")
    monkeypatch.setattr(benchkit, "read_cpu_times", lambda: None)
    benchkit.write_report(tmp_path, "y", {"a": 1}, "# Y\n", echo=False)
    assert json.loads((tmp_path / "y.json").read_text()) == {"a": 1}
    assert (tmp_path / "y.md").read_text() == "# Y\n"


@pytest.mark.parametrize("in_use", [True, False])
def test_write_report_says_which_selection_ops_ran(tmp_path, monkeypatch,
                                                   in_use):
    class Native:  # stands in for keras_freetickets.native (no TensorFlow)
        @staticmethod
        def available():
            return in_use

    monkeypatch.setitem(sys.modules, "keras_freetickets.native", Native)
    monkeypatch.setattr(benchkit, "read_cpu_times", lambda: None)
    benchkit.write_report(tmp_path, "z", {"a": 1}, "# Z\n", echo=False)
    report = json.loads((tmp_path / "z.json").read_text())
    assert report == {"a": 1, "compiled_selection_op": in_use}
    text = (tmp_path / "z.md").read_text()
    assert text.startswith("# Z\n- Mask-update selections: ")
    assert ("the compiled op (`keras_freetickets.native`)" in text) == in_use
    assert ("TensorFlow's ops" in text) != in_use
