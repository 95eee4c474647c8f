"""benchkit's machine readings and shared flag parsing: the CPU steal and
the cache sizes every speed report adds about its machine, and the thread
settings the serving scripts take (no TensorFlow here)."""

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


def _cache(root, index, level, kind, size):
    folder = root / f"index{index}"
    folder.mkdir(parents=True)
    (folder / "level").write_text(f"{level}\n")
    (folder / "type").write_text(f"{kind}\n")
    (folder / "size").write_text(f"{size}\n")


def test_cache_sizes_names_the_data_and_unified_caches_in_level_order(tmp_path):
    _cache(tmp_path, 3, 3, "Unified", "266240K")
    _cache(tmp_path, 0, 1, "Data", "48K")
    _cache(tmp_path, 1, 1, "Instruction", "32K")
    _cache(tmp_path, 2, 2, "Unified", "2048K")
    assert benchkit.cache_sizes(tmp_path) == "L1d 48 KiB, L2 2 MiB, L3 260 MiB"


def test_cache_sizes_skips_what_it_cannot_read(tmp_path):
    assert benchkit.cache_sizes(tmp_path / "absent") == ""
    _cache(tmp_path, 0, 2, "Unified", "big")
    _cache(tmp_path, 1, 3, "Unified", "1M")
    (tmp_path / "index2").mkdir()  # no files
    assert benchkit.cache_sizes(tmp_path) == "L3 1 MiB"


def test_parse_threads_keeps_the_order_and_names_a_bad_entry():
    assert benchkit.parse_threads([" 1:2", "default", ""]) == {
        "1:2": (1, 2), "default": None}
    for bad in ("2", "0:2", "1:x", "1:2:3", "1:\u00b2", "-1:2"):
        with pytest.raises(Exception, match=(
                r"Flag --threads must list 'default' or INTRA:INTER with positive "
                rf"integers, such as 1:2. Received: '{bad}'")):
            benchkit.parse_threads(["default", bad])
    with pytest.raises(Exception, match="Flag --pools must name at least one setting."):
        benchkit.parse_threads([" "], flag="pools")


def test_softmax_normalises_each_row_without_overflow():
    import numpy as np

    logits = np.array([[0.0, 1.0, 2.0], [1000.0, 1000.0, 990.0]])
    probs = benchkit.softmax(logits)
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-6)
    e = np.exp([0.0, 1.0, 2.0])
    np.testing.assert_allclose(probs[0], e / e.sum(), rtol=1e-6)
    # Large logits: only the differences matter (no inf / nan).
    np.testing.assert_allclose(probs[1], benchkit.softmax(logits[1:] - 990.0)[0],
                               rtol=1e-6)
    assert probs[1, 0] == probs[1, 1] > probs[1, 2]
