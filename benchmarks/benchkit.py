"""What every benchmark script shares: its start and its report.

Importing this module, first in a script (before absl, TensorFlow or Keras):
sets TensorFlow's C++ log level to warnings and the Keras backend to
TensorFlow (unless the environment says otherwise), and puts the checkout and
`benchmarks/` on `sys.path` (after what is there, so that another copy of the
library on PYTHONPATH comes first). The rest is the report every figure
carries (BENCHMARK.md: protocol, machine, command line) and its writing.
"""

import datetime
import json
import os
import pathlib
import platform
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):
    if _path not in sys.path:
        sys.path.append(_path)

from protocols import PROTOCOL_NAMES  # noqa: E402


# ------------------------------------------------------------------- flags
def _usage_error(message):
    from absl import app

    return app.UsageError(message)


def no_arguments(argv):
    """Refuses positional arguments (absl passes them to `main`)."""
    if len(argv) > 1:
        raise _usage_error(f"Unexpected arguments: {argv[1:]}")


def parse_models(values, flag="models"):
    """The protocol keys of a `--models` list, blanks dropped; a usage error
    names an unknown key or an empty list."""
    models = [m.strip() for m in values if m.strip()]
    for m in models:
        if m not in PROTOCOL_NAMES:
            raise _usage_error(
                f"Flag --{flag} must list names in {sorted(PROTOCOL_NAMES)}. "
                f"Received: {m!r}"
            )
    if not models:
        raise _usage_error(f"Flag --{flag} must name at least one model.")
    return models


def parse_threads(values, flag="threads"):
    """{label: None (TensorFlow's default) or (intra, inter)} from a list of
    thread settings ('default' or INTRA:INTER), in order; a usage error
    names a bad entry or an empty list."""
    settings = {}
    for value in (v.strip() for v in values):
        if not value:
            continue
        if value == "default":
            settings[value] = None
            continue
        parts = value.split(":")
        pools = [int(p) if p.isascii() and p.isdigit() else 0 for p in parts]
        if len(pools) != 2 or 0 in pools:
            raise _usage_error(
                f"Flag --{flag} must list 'default' or INTRA:INTER with "
                f"positive integers, such as 1:2. Received: {value!r}"
            )
        settings[value] = tuple(pools)
    if not settings:
        raise _usage_error(f"Flag --{flag} must name at least one setting.")
    return settings


def require_at_least(flag_values, names, minimum=1):
    """A usage error for the first flag of `names` below `minimum`."""
    for name in names:
        value = flag_values[name].value
        if value < minimum:
            raise _usage_error(
                f"Flag --{name} must be >= {minimum}. Received: {value}"
            )


# ------------------------------------------------------------------ report
def machine_description():
    """'<n>-core CPU (<model name>), 1-minute load average <x> at the
    start': the load says whether other jobs shared the machine."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    caches = cache_sizes()
    if caches:
        model = f"{model}; {caches}"
    try:
        load = f", 1-minute load average {os.getloadavg()[0]:.1f} at the start"
    except OSError:
        load = ""
    return f"{os.cpu_count()}-core CPU ({model}){load}"


def cache_sizes(root="/sys/devices/system/cpu/cpu0/cache"):
    """'L1d 48 KiB, L2 2 MiB, L3 260 MiB': the data and unified caches the
    first CPU sees (Linux's sysfs), or '' where they cannot be read. Batch-1
    times depend on them: a kernel that fits in L2 is read several times
    faster than one that does not."""
    found = []
    for index in sorted(pathlib.Path(root).glob("index*")):
        try:
            level = (index / "level").read_text().strip()
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction" or not size[:-1].isdigit() or size[-1] not in "KM":
            continue
        kib = int(size[:-1]) * (1024 if size[-1] == "M" else 1)
        text = f"{kib // 1024} MiB" if kib % 1024 == 0 else f"{kib} KiB"
        found.append((int(level) if level.isdigit() else 0,
                       f"L{level}{'d' if kind == 'Data' else ''} {text}"))
    return ", ".join(name for _, name in sorted(found))


def cpu_times(stat_text):
    """(steal, total) jiffies of all CPUs from the text of /proc/stat, or
    None when its first line is not the "cpu" summary. The total is user,
    nice, system, idle, iowait, irq, softirq and steal (guest time is
    already counted in user and nice)."""
    fields = stat_text.split("\n", 1)[0].split()
    if len(fields) < 9 or fields[0] != "cpu" or not all(
            f.isascii() and f.isdigit() for f in fields[1:9]):
        return None
    values = [int(f) for f in fields[1:9]]
    return values[7], sum(values)


def read_cpu_times():
    """`cpu_times` of this machine now, or None where /proc/stat is absent."""
    try:
        return cpu_times(pathlib.Path("/proc/stat").read_text())
    except OSError:
        return None


_START_CPU_TIMES = read_cpu_times()  # benchkit is a script's first import


def steal_share(start, end):
    """The share of the CPU time between two `cpu_times` readings that the
    hypervisor gave to other guests (steal), or None when unknown."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def command_line(script, argv=None):
    """`python benchmarks/<script>.py <arguments>`, as the report records it."""
    argv = sys.argv if argv is None else argv
    return " ".join(["python", f"benchmarks/{script}.py"] + list(argv[1:]))


def utc_now():
    """The report's date: UTC, ISO 8601, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def versions():
    """The versions a report records: TensorFlow, Keras, Python, this library."""
    import keras
    import tensorflow as tf

    import keras_freetickets as kft

    return dict(tensorflow=tf.__version__, keras=keras.__version__,
                python=platform.python_version(), keras_freetickets=kft.__version__)


def report_header(benchmark, protocols, library_path=False):
    """The first keys of a speed or storage report: what ran, on which
    protocols and machine, when, with which versions and command line
    (`library_path`: also the folder the library was imported from)."""
    header = dict(
        benchmark=benchmark,
        protocols=list(protocols),
        machine=machine_description(),
        cpu_count=os.cpu_count(),
        date=utc_now(),
        versions=versions(),
    )
    if library_path:
        import keras_freetickets as kft

        header["library_path"] = str(pathlib.Path(kft.__file__).parent)
    header["command"] = command_line(benchmark)
    return header


def set_thread_pools(setting):
    """Sets TensorFlow's intra-op and inter-op pools from a `parse_threads`
    value ((intra, inter), or None for TensorFlow's default) and returns
    the [intra, inter] in effect (0: TensorFlow's default). Call it before
    the process's first op: TensorFlow fixes its pools then."""
    import tensorflow as tf

    if setting is not None:
        intra, inter = setting
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    return [tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads()]


def run_child(script, spec, marker):
    """Runs `script` (a path) with `--child=<spec as JSON>` in a fresh Python
    process and returns the JSON it printed after `marker` on its last such
    line; a failure raises with the child's stderr. For settings that bind a
    whole process (TensorFlow's thread pools) and for processes that must
    not import the library."""
    import subprocess

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, str(script), f"--child={json.dumps(spec)}"],
        capture_output=True, text=True, env=env, check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(marker + " ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{pathlib.Path(script).name} child failed (rc={proc.returncode}):\n"
            f"{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(marker) + 1:])


def environment_info(script, argv=None, shared=False):
    """The environment that the results tables (`fmnist_table.py`,
    `ablations.py`) print under their rows: the local date, the machine as
    '<n>-core CPU (<arch>, <OS>)' (', shared with other jobs' when
    `shared`), the versions and the command line."""
    import keras
    import tensorflow as tf

    machine = f"{os.cpu_count()}-core CPU ({platform.machine()}, {platform.system()})"
    return dict(
        date=datetime.datetime.now().strftime("%Y-%m-%d"),
        machine=machine + (", shared with other jobs" if shared else ""),
        python=platform.python_version(), keras=keras.__version__,
        tensorflow=tf.__version__, cpu_count=os.cpu_count(),
        command=command_line(script, argv),
    )


def softmax(logits):
    """The softmax of an array of logits over its last axis, as float32
    (NumPy, for the benchmarks that average members' predictions)."""
    import numpy as np

    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def write_report(out, stem, report, markdown, echo=True):
    """Writes `<out>/<stem>.json` (the report) and `<out>/<stem>.md`, making
    `out`; prints the markdown when `echo`. Both get the CPU steal since the
    script started, where the machine tells it: on a shared virtual machine
    it says how much of a run's noise came from other guests."""
    share = steal_share(_START_CPU_TIMES, read_cpu_times())
    if share is not None:
        report = dict(report, cpu_steal_share=share)
        markdown = (markdown.rstrip("\n") + "\n\n- CPU steal since the script "
                    f"started (time the hypervisor gave other guests): {share:.1%}.\n")
    if "keras_freetickets.native" in sys.modules:
        # A script that ran mask updates: which selection ops they traced.
        in_use = sys.modules["keras_freetickets.native"].available()
        report = dict(report, compiled_selection_op=in_use)
        markdown = (markdown.rstrip("\n") + "\n- Mask-update selections: "
                    + ("the compiled op (`keras_freetickets.native`)" if in_use
                       else "TensorFlow's ops (the compiled op is not built "
                       "or is off)") + ".\n")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    if echo:
        print(markdown)
