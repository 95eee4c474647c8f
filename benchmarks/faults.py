"""The fault matrix: kills, malformed inputs, numeric, storage, concurrency
and serving faults, each with its number of trials and what was lost.

    python benchmarks/faults.py                      # full campaign
    python benchmarks/faults.py --kill_trials=4 --out_dir=/tmp/faults  # quick

Writes `faults.md` (the table) and `faults.json` (every trial) to
`--out_dir` (default `benchmarks/results`). Fault classes (`--classes`):

- `kills`: SIGKILL at seeded random points of a small EDST run (EDSTCallback
  + kft.BackupAndRestore, then `ensemble.export`) and of a small DST run
  (`train_dst_ensemble`, one kft.BackupAndRestore per member, then export),
  each a child process of this script (`--worker`). A share of the kills are
  aimed at the dangerous windows: inside a member save, an export, a backup
  write (just before one of their file operations, or after a random
  fraction of the window's measured duration) and the global-exploration
  step. After each kill the same command is run again until it completes;
  its member files must equal those of an uninterrupted run byte for byte,
  its export must hold the same files and serve the same outputs bit for
  bit, and no temporary file, backup or extra member may be left.
- `inputs`: malformed arguments and files; each must raise a ValueError
  (or TypeError, FileNotFoundError, ...) whose message names the argument
  and the value, from no frame inside TensorFlow.
- `numeric`: NaN/Inf inputs or labels on a mask-update step, an overflowing
  loss under mixed_float16, TerminateOnNaN beside EDSTCallback and
  kft.BackupAndRestore.
- `storage`: ENOSPC/EIO injected into the writer of a member file, an export
  and an overwrite of an export.
- `concurrency`: a reader loading members while they are rewritten, a
  reader while a member is missing, and two worker processes writing the
  members of one DST ensemble into one folder while a reader polls it.
- `serving`: bad requests to the exported signatures in a process that
  never imports keras_freetickets (and through `saved_model_cli run`).

Flags are checked before TensorFlow is imported.
"""

import hashlib
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import time

import benchkit  # first: sets what TensorFlow reads at import, and sys.path

from absl import app
from absl import flags

REPO = benchkit.REPO
CLASSES = ("kills", "inputs", "numeric", "storage", "concurrency", "serving")
SCENARIOS = ("edst", "dst")
ROW_CLASS = {"kills": "kill", "inputs": "malformed input", "numeric": "numeric",
             "storage": "storage", "concurrency": "concurrency", "serving": "serving"}

FLAGS = flags.FLAGS


def define_flags():
    """Defines the flags (only when run as a script, so that tests can
    import this module beside other benchmarks)."""
    flags.DEFINE_string("out_dir", str(REPO / "benchmarks" / "results"),
                        "Folder for faults.md and faults.json.")
    flags.DEFINE_string("work_dir", None,
                        "Scratch folder (default: a new temporary folder).")
    flags.DEFINE_integer("kill_trials", 32, "SIGKILL trials (EDST and DST).")
    flags.DEFINE_integer("seed", 0, "Seed of the kill times and targets.")
    flags.DEFINE_list("classes", list(CLASSES), "Fault classes to run.")
    flags.DEFINE_integer("trial_timeout_s", 240, "Hard limit of one child run.")
    flags.DEFINE_integer("parallel", 1, "Kill trials run at the same time.")
    flags.DEFINE_bool("reverse", False,
                      "Run the planned kill trials last first (a second campaign "
                      "process, with its own --work_dir, then meets the first "
                      "in the middle; merge their trials.jsonl).")
    flags.DEFINE_float("deadline_s", None,
                       "Start no kill trial after this many seconds (the report "
                       "counts the trials that ran).")
    flags.DEFINE_list("merge_json", [],
                      "faults.json files of earlier runs: their fault classes are "
                      "taken from them instead of being run again (to run the "
                      "slow kill campaign apart from the other classes).")
    flags.DEFINE_string("dst_reference", None,
                        "Members folder of an uninterrupted DST run, compared with "
                        "the members that worker processes write (default: the "
                        "kill campaign's).")
    # Internal: the training command that the kill campaign runs and kills.
    flags.DEFINE_enum("worker", None, list(SCENARIOS), "Run one training command.")
    flags.DEFINE_integer("member_index", None, "DST worker: train this member only.")


def validate_flags():
    problems = []
    if FLAGS.kill_trials < 0:
        problems.append(f"--kill_trials must be >= 0. Received: {FLAGS.kill_trials}")
    if FLAGS.parallel < 1:
        problems.append(f"--parallel must be >= 1. Received: {FLAGS.parallel}")
    if FLAGS.trial_timeout_s < 10:
        problems.append(
            f"--trial_timeout_s must be >= 10. Received: {FLAGS.trial_timeout_s}")
    unknown = [c for c in FLAGS.classes if c not in CLASSES]
    if unknown or not FLAGS.classes:
        problems.append(
            f"--classes must be a non-empty subset of {list(CLASSES)}. "
            f"Received: {FLAGS.classes}")
    if FLAGS.worker and not FLAGS.work_dir:
        problems.append("--worker needs --work_dir.")
    if problems:
        raise app.UsageError("\n".join(problems))


def child_env(threads=1):
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.update(
        TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow",
        CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
        TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS=str(threads),
        PYTHONPATH=os.pathsep.join(
            p for p in (str(REPO), env.get("PYTHONPATH")) if p),
    )
    return env


# =========================================================================
# The training command of the kill campaign (run as a child process).
# =========================================================================
# Small and fast: an MLP 16-32-4 on 256 synthetic examples, batch 32.
FEATURES, HIDDEN, CLASSES_N, EXAMPLES, BATCH = 16, 32, 4, 256, 32
EDST = dict(num_members=3, exploration_epochs=2, refinement_epochs=2)
DST = dict(num_members=3, epochs=3)
UPDATE_INTERVAL = 3
WINDOWS = ("member_save", "export", "backup", "global_exploration")
_EVENTS = None  # fd of the event log (append-only, unbuffered)


def _event(*parts):
    if _EVENTS is not None:
        os.write(_EVENTS, (" ".join(str(p) for p in parts) + "\n").encode())


def _die():
    _event("killed")
    os.kill(os.getpid(), signal.SIGKILL)


class _Windows:
    """Marks the dangerous windows in the event log, counts the file
    operations inside them, and kills the process where the plan says."""

    OPS = (("os", "replace"), ("os", "rename"), ("os", "fsync"),
           ("os", "mkdir"), ("os", "open"), ("shutil", "rmtree"))

    def __init__(self, plan):
        self.plan = plan or {}
        self.count = {}
        self.current = None
        self.ops = 0

    def enter(self, name):
        self.count[name] = self.count.get(name, 0) + 1
        self.current, self.ops = name, 0
        _event("enter", name, self.count[name], f"{time.monotonic():.6f}")
        plan = self.plan
        if plan.get("window") == name and plan.get("occurrence") == self.count[name]:
            if plan["mode"] == "timer":
                import threading

                timer = threading.Timer(plan["delay"], _die)
                timer.daemon = True
                timer.start()
            elif plan["op"] == 0:
                _die()

    def exit(self, name):
        _event("exit", name, self.count[name], self.ops, f"{time.monotonic():.6f}")
        self.current = None

    def op(self):
        if self.current is None:
            return
        self.ops += 1
        plan = self.plan
        if (plan.get("mode") == "op" and plan.get("window") == self.current
                and plan.get("occurrence") == self.count[self.current]
                and plan.get("op") == self.ops):
            _die()

    def wrap(self, name, fn):
        def wrapper(*args, **kwargs):
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit(name)
        return wrapper

    def install(self):
        import importlib
        import zipfile

        for module_name, attr in self.OPS:
            module = importlib.import_module(module_name)
            real = getattr(module, attr)
            setattr(module, attr, self._counted(real))
        zipfile.ZipFile.writestr = self._counted(zipfile.ZipFile.writestr)

    def _counted(self, real):
        def counted(*args, **kwargs):
            self.op()
            return real(*args, **kwargs)
        return counted


def _data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(EXAMPLES, FEATURES)).astype("float32")
    w = rng.normal(size=(FEATURES, CLASSES_N)).astype("float32")
    y = (x @ w).argmax(1).astype("int64")
    return x, y


def _mlp(seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((FEATURES,)),
        keras.layers.Dense(HIDDEN, activation="relu", name="hidden"),
        keras.layers.Dense(CLASSES_N, name="logits"),
    ], name="mlp")


def run_worker(scenario, work_dir, member_index=None):
    """The command that the kill campaign runs, kills and runs again:
    resumable training, then an export if none is there yet."""
    global _EVENTS
    work_dir = pathlib.Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    _EVENTS = os.open(work_dir / "events.log",
                      os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _event("start", f"{time.monotonic():.6f}")
    windows = _Windows(json.loads(os.environ.get("KFT_FAULT_PLAN", "{}")))
    import keras
    import tensorflow as tf

    import keras_freetickets as kft
    from keras_freetickets import backup as backup_lib
    from keras_freetickets import export as export_lib
    from keras_freetickets import members as members_lib

    tf.config.experimental.enable_op_determinism()
    members_lib.save_member = windows.wrap("member_save", members_lib.save_member)
    export_lib.export_ensemble = windows.wrap("export", export_lib.export_ensemble)
    backup_lib.write_checkpoint = windows.wrap("backup", backup_lib.write_checkpoint)
    windows.install()
    _event("imported", f"{time.monotonic():.6f}")

    x, y = _data()
    members_dir = str(work_dir / "members")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if scenario == "edst":
        keras.utils.set_random_seed(0)
        model = _mlp(0)
        opt = kft.SparseOptimizer(
            keras.optimizers.SGD(0.05, momentum=0.9), sparsity=0.8,
            update_interval=UPDATE_INTERVAL, seed=0)
        model.compile(opt, loss)
        edst = kft.EDSTCallback(member_dir=members_dir, quiet_steps=2, **EDST)

        class GlobalStep(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                step = int(opt.iterations.numpy())
                self.inside = step == int(opt.global_explore_step.numpy())
                if self.inside:
                    windows.enter("global_exploration")

            def on_train_batch_end(self, batch, logs=None):
                if self.inside:
                    windows.exit("global_exploration")

            def on_epoch_end(self, epoch, logs=None):
                _event("epoch_end", epoch)

        backup = kft.BackupAndRestore(str(work_dir / "backup"))

        class Restored(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                _event("restored", backup.restored_from)

        model.fit(x, y, batch_size=BATCH, epochs=edst.total_epochs,
                  shuffle=False, verbose=0,
                  callbacks=[edst, backup, Restored(), GlobalStep()])
    else:
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)

        def callbacks(index):
            backup = kft.BackupAndRestore(str(work_dir / "backup" / f"member_{index}"))

            class Restored(keras.callbacks.Callback):
                def on_train_begin(self, logs=None):
                    _event("restored", backup.restored_from)

            return [backup, Restored()]

        kft.train_dst_ensemble(
            _mlp, data, sparsity=0.8, member_dir=members_dir,
            member_index=member_index, update_interval=UPDATE_INTERVAL,
            callbacks=callbacks, verbose=0, **DST)
        if member_index is not None:
            _event("done")
            return
    export_dir = work_dir / "export" / "1"
    if not export_dir.exists():
        ensemble = kft.FreeTicketsEnsemble.from_directory(members_dir)
        ensemble.export(str(export_dir))
    _event("done")


# =========================================================================
# The kill campaign.
# =========================================================================
def _run_child(scenario, work_dir, plan=None, kill_after=None, timeout_s=240,
               member_index=None, env=None):
    """Runs the worker; kills it after `kill_after` seconds if given.
    Returns (returncode, seconds, stderr tail)."""
    env = dict(env or child_env())
    if plan:
        env["KFT_FAULT_PLAN"] = json.dumps(plan)
    args = [sys.executable, str(pathlib.Path(__file__).resolve()),
            f"--worker={scenario}", f"--work_dir={work_dir}"]
    if member_index is not None:
        args.append(f"--member_index={member_index}")
    start = time.monotonic()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=str(REPO))
    try:
        if kill_after is not None:
            try:
                proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, time.monotonic() - start, err.decode(errors="replace")[-3000:]


def read_events(work_dir):
    path = pathlib.Path(work_dir) / "events.log"
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line]


def _runs(events):
    """Splits an event log into runs (a list of event lists)."""
    runs = []
    for event in events:
        if event[0] == "start":
            runs.append([])
        if runs:
            runs[-1].append(event)
    return runs


def window_profile(events):
    """From an uninterrupted run's events: every window occurrence with its
    duration and number of file operations, and the run's time span."""
    occurrences, open_at = [], {}
    start = imported = end = None
    for event in events:
        if event[0] == "start":
            start = float(event[1])
        elif event[0] == "imported":
            imported = float(event[1])
        elif event[0] == "enter":
            open_at[(event[1], int(event[2]))] = float(event[3])
        elif event[0] == "exit":
            key = (event[1], int(event[2]))
            t = float(event[4])
            occurrences.append(dict(window=key[0], occurrence=key[1],
                                    ops=int(event[3]), seconds=t - open_at[key],
                                    at=t - start))
            end = t
    return dict(occurrences=occurrences, import_s=imported - start,
                span_s=(end or imported) - start)


def landed(events):
    """Where the last run of an event log was killed."""
    run = _runs(events)[-1] if events else []
    inside = None
    for event in run:
        if event[0] == "enter":
            inside = event[1]
        elif event[0] == "exit":
            inside = None
    if not run or run[-1][0] == "done":
        return "after completion"
    if not any(e[0] == "imported" for e in run):
        return "during imports"
    return f"inside {inside}" if inside else "between windows"


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(work_dir):
    """What a finished command left: members (hashes), export files, and
    leftovers (temporary files, backups, unexpected members)."""
    work_dir = pathlib.Path(work_dir)
    members = {}
    leftovers = []
    for path in sorted((work_dir / "members").glob("*")) if (
            work_dir / "members").exists() else []:
        if path.name.startswith("member_") and path.name.endswith(".kftm"):
            members[path.name] = sha256(path)
        else:
            leftovers.append(str(path.relative_to(work_dir)))
    export = work_dir / "export" / "1"
    export_files = sorted(
        str(p.relative_to(export)) for p in export.rglob("*") if p.is_file()
    ) if export.exists() else []
    for path in work_dir.rglob("*"):
        name = path.name
        if ".tmp" in name or ".old-" in name or name.startswith(".candidate"):
            leftovers.append(str(path.relative_to(work_dir)))
    if (work_dir / "backup").exists() and any(
            p.is_file() for p in (work_dir / "backup").rglob("*")):
        leftovers.append("backup/ (not deleted at the end of fit)")
    if (work_dir / "export").exists():
        extra = [p.name for p in (work_dir / "export").iterdir() if p.name != "1"]
        leftovers.extend(f"export/{n}" for n in extra)
    return dict(members=members, export_files=export_files,
                leftovers=sorted(set(leftovers)))


PROBE_SEED = 123


def export_outputs(export_dir):
    """Serving outputs of an export on fixed probe inputs, and its variables."""
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(str(export_dir))
    probe = np.random.default_rng(PROBE_SEED).normal(
        size=(64, FEATURES)).astype("float32")
    result = {}
    for name in ("serving_default", "members"):
        outputs = loaded.signatures[name](inputs=tf.constant(probe))
        for key, value in outputs.items():
            result[f"{name}/{key}"] = value.numpy()
    for i, variable in enumerate(loaded.variables):
        result[f"variable/{i}/{variable.name}"] = variable.numpy()
    return result


def same_outputs(a, b):
    import numpy as np

    return sorted(a) == sorted(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and a[k].tobytes() == b[k].tobytes() for k in a) and all(
        not np.isnan(a[k]).any() for k in a if a[k].dtype.kind == "f")


def reference(scenario, root, timeout_s):
    folder = pathlib.Path(root) / f"reference_{scenario}"
    events = read_events(folder)
    runs = _runs(events)
    if len(runs) == 1 and runs[0][-1][0] == "done":
        seconds = float("nan")  # reused from an earlier, interrupted campaign
    else:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        code, seconds, err = _run_child(scenario, folder, timeout_s=timeout_s)
        if code != 0:
            raise RuntimeError(f"The uninterrupted {scenario} run failed:\n{err}")
        events = read_events(folder)
    return dict(folder=str(folder), seconds=seconds,
                profile=window_profile(events), snapshot=snapshot(folder),
                outputs=export_outputs(folder / "export" / "1"))


def plan_trials(trials, seed, references):
    """Seeded kill plans: 40% at a uniform time over the run after imports,
    60% aimed at a window occurrence (before a file operation, or after a
    fraction of its duration)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    plans = []
    for trial in range(trials):
        scenario = SCENARIOS[trial % 2] if trial % 5 else "edst"
        ref = references[scenario]["profile"]
        occurrences = [o for o in ref["occurrences"]]
        if rng.random() < 0.4 or not occurrences:
            t = float(rng.uniform(ref["import_s"], ref["span_s"]))
            plans.append(dict(trial=trial, scenario=scenario, kind="time",
                              kill_after=round(t, 3)))
            continue
        windows = sorted({o["window"] for o in occurrences})
        window = windows[int(rng.integers(len(windows)))]
        chosen = [o for o in occurrences if o["window"] == window]
        occ = chosen[int(rng.integers(len(chosen)))]
        if occ["ops"] > 0 and rng.random() < 0.6:
            plan = dict(window=window, occurrence=occ["occurrence"], mode="op",
                        op=int(rng.integers(1, occ["ops"] + 1)))
        else:
            plan = dict(window=window, occurrence=occ["occurrence"], mode="timer",
                        delay=round(float(rng.uniform(0, max(occ["seconds"], 1e-3))), 6))
        plans.append(dict(trial=trial, scenario=scenario, kind="window", plan=plan))
    return plans


def kill_trial(plan, root, references, timeout_s):
    """One kill and the restarts until the command completes."""
    import shutil

    scenario = plan["scenario"]
    folder = pathlib.Path(root) / f"trial_{plan['trial']:03d}_{scenario}"
    shutil.rmtree(folder, ignore_errors=True)
    code, seconds, err = _run_child(
        scenario, folder, plan=plan.get("plan"), kill_after=plan.get("kill_after"),
        timeout_s=timeout_s)
    events = read_events(folder)
    record = dict(plan, first_returncode=code, killed=code == -signal.SIGKILL,
                  landed=landed(events), first_seconds=round(seconds, 2))
    restarts = 0
    while code != 0 and restarts < 3:
        restarts += 1
        code, _, err = _run_child(scenario, folder, timeout_s=timeout_s)
    record["restarts"] = restarts
    record["completed"] = code == 0
    if code != 0:
        record["error"] = err[-1500:]
        record.update(lost=True, half_written=True)
        return record
    runs = _runs(read_events(folder))
    record["resumed_from"] = next(
        (e[1] for e in runs[-1] if e[0] == "restored" and e[1] != "None"),
        None) if len(runs) > 1 else None
    snap = snapshot(folder)
    ref = references[scenario]
    record["members_equal"] = snap["members"] == ref["snapshot"]["members"]
    record["export_files_equal"] = snap["export_files"] == ref["snapshot"]["export_files"]
    record["export_outputs_equal"] = same_outputs(
        export_outputs(folder / "export" / "1"), ref["outputs"])
    record["leftovers"] = snap["leftovers"]
    record["lost"] = not (record["members_equal"] and record["export_files_equal"]
                          and record["export_outputs_equal"])
    record["half_written"] = bool(snap["leftovers"])
    if not (record["lost"] or record["half_written"]):
        shutil.rmtree(folder, ignore_errors=True)
    return record


def kill_campaign(root, trials, seed, timeout_s=240, scenarios=SCENARIOS, parallel=1,
                  deadline_s=None, reverse=False):
    """Runs `trials` kill trials (`parallel` at a time, each in its own
    folder); returns (rows, records). Each finished trial is appended to
    `root/trials.jsonl`, so that a campaign run again with the same
    arguments and `root` only runs the trials still missing. Trials not
    started `deadline_s` seconds after the start are left out."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    log = root / "trials.jsonl"
    finished = {}
    if log.exists():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            finished[(record["trial"], record["scenario"])] = record
    lock = threading.Lock()

    def run(plan):
        key = (plan["trial"], plan["scenario"])
        if key in finished:
            return finished[key]
        if deadline_s is not None and time.monotonic() - start > deadline_s:
            return None
        record = kill_trial(plan, root, references, timeout_s)
        with lock, open(log, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        return record

    with ThreadPoolExecutor(max(1, parallel)) as pool:
        references = dict(zip(scenarios, pool.map(
            lambda s: reference(s, root, timeout_s), scenarios)))
        plans = [p for p in plan_trials(trials, seed, references)
                 if p["scenario"] in scenarios]
        order = plans[::-1] if reverse else plans
        records = sorted((r for r in pool.map(run, order) if r is not None),
                         key=lambda r: r["trial"])
    rows = []
    for scenario in scenarios:
        for target in ("time",) + WINDOWS:
            chosen = [r for r in records if r["scenario"] == scenario and (
                r["kind"] == "time" if target == "time"
                else r.get("plan", {}).get("window") == target)]
            if not chosen:
                continue
            where = {}
            for r in chosen:
                where[r["landed"]] = where.get(r["landed"], 0) + 1
            ok = [r for r in chosen if r["completed"] and not r["lost"]
                  and not r["half_written"]]
            label = ("at a seeded random time" if target == "time"
                     else f"aimed inside {target.replace('_', ' ')}")
            rows.append(dict(
                fault_class="kill", fault=f"{scenario.upper()}: SIGKILL {label}, restart",
                trials=len(chosen),
                outcome=(f"{len(ok)}/{len(chosen)} completed with members and export "
                         "equal to the uninterrupted run; kills landed "
                         + ", ".join(f"{k}: {v}" for k, v in sorted(where.items()))),
                lost=sum(r["lost"] for r in chosen),
                half_written=sum(r["half_written"] for r in chosen),
            ))
    reference_info = {s: dict(seconds=round(r["seconds"], 2),
                              members=r["snapshot"]["members"],
                              windows=r["profile"]["occurrences"])
                      for s, r in references.items()}
    return rows, dict(references=reference_info, trials=records)



# =========================================================================
# Malformed inputs.
# =========================================================================
class _Patched:
    """Sets an attribute for the duration of a `with` block."""

    def __init__(self, obj, name, value):
        self.obj, self.name, self.value = obj, name, value

    def __enter__(self):
        self.old = getattr(self.obj, self.name)
        setattr(self.obj, self.name, self.value)

    def __exit__(self, *exc):
        setattr(self.obj, self.name, self.old)


class _Env:
    """Sets an environment variable for the duration of a `with` block."""

    def __init__(self, name, value):
        self.name, self.value = name, value

    def __enter__(self):
        self.old = os.environ.get(self.name)
        os.environ[self.name] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.old


def _small(inputs=8, classes=3, hidden=12, seed=0, name=None):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((inputs,)), keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(classes)], name=name)


def malformed_cases(tmp):
    """(fault, callable, substrings the message must hold) for each case."""
    import keras
    import numpy as np

    import keras_freetickets as kft
    from keras_freetickets import distributed
    from keras_freetickets import export as export_lib
    from keras_freetickets import members as members_lib

    tmp = pathlib.Path(tmp)
    sgd = lambda: keras.optimizers.SGD(0.1)  # noqa: E731
    loss = lambda: keras.losses.SparseCategoricalCrossentropy(True)  # noqa: E731
    x = np.zeros((8, 8), "float32")
    y = np.zeros(8, "int64")

    def fit_with(model, **opt_kwargs):
        opt = kft.SparseOptimizer(sgd(), **opt_kwargs)
        model.compile(opt, loss())
        model.fit(x, y, epochs=1, verbose=0)

    def no_prunable():
        model = keras.Sequential([keras.Input((8,)),
                                  keras.layers.BatchNormalization()])
        opt = kft.SparseOptimizer(sgd(), sparsity=0.5)
        model.compile(opt, "mse")
        model.fit(x, x, epochs=1, verbose=0)

    class Unmarked(keras.layers.Layer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], 3), name="w")

        def call(self, inputs):
            return inputs @ self.w

    def unmarked():
        model = keras.Sequential([keras.Input((8,)), Unmarked(name="custom")])
        fit_with(model, sparsity=0.5)

    def members_dir(name, models):
        folder = tmp / name
        for i, model in enumerate(models):
            members_lib.save_member(model, members_lib.member_path(folder, i),
                                    overwrite=True)
        return folder

    def conv():
        import keras as k
        return k.Sequential([k.Input((4, 4, 1)), k.layers.Conv2D(2, 3),
                             k.layers.Flatten(), k.layers.Dense(3)])

    def from_dir(folder):
        return lambda: kft.FreeTicketsEnsemble.from_directory(folder)

    def member_file(name, edit):
        import zipfile
        path = tmp / f"{name}.kftm"
        members_lib.save_member(_small(), path, overwrite=True)
        edit(path, zipfile)
        return path

    def truncate(path, zipfile):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    def future_format(path, zipfile):
        with zipfile.ZipFile(path) as zf:
            entries = {n: zf.read(n) for n in zf.namelist()}
        manifest = json.loads(entries["kftm.json"])
        manifest["format_version"] = 2
        entries["kftm.json"] = json.dumps(manifest).encode()
        with zipfile.ZipFile(path, "w") as zf:
            for n, d in entries.items():
                zf.writestr(n, d)

    def keras_file_from_other_version():
        import zipfile
        model = _small()
        model.compile(kft.SparseOptimizer(sgd(), sparsity=0.5), loss())
        model.fit(x, y, epochs=1, verbose=0)
        path = tmp / "other_version.keras"
        model.save(path)
        with zipfile.ZipFile(path) as zf:
            entries = {n: zf.read(n) for n in zf.namelist()}
        config = json.loads(entries["config.json"])
        config["compile_config"]["optimizer"]["config"]["mask_format"] = "v9"
        entries["config.json"] = json.dumps(config).encode()
        with zipfile.ZipFile(path, "w") as zf:
            for n, d in entries.items():
                zf.writestr(n, d)
        keras.models.load_model(path)

    def export_to(path, **kwargs):
        ensemble = kft.FreeTicketsEnsemble([_small()])
        return lambda: export_lib.export_ensemble(ensemble, path, **kwargs)

    def gap_dir():
        folder = members_dir("gap", [_small(), _small()])
        os.replace(members_lib.member_path(folder, 1),
                   members_lib.member_path(folder, 2))
        (folder / ".member_1.kftm.0123.tmp").write_bytes(b"PK")
        return folder

    def edst_on(model_opt, epochs=8):
        model = _small()
        model.compile(model_opt, loss())
        edst = kft.EDSTCallback(num_members=2, exploration_epochs=2,
                                refinement_epochs=2, member_dir=str(tmp / "e"))
        model.fit(x, y, epochs=epochs, verbose=0, callbacks=[edst])

    def unreadable_dir():
        folder = members_dir("unreadable", [_small()])

        def refuse(path):
            raise PermissionError(13, "Permission denied", str(path))
        with _Patched(os, "listdir", refuse):
            kft.FreeTicketsEnsemble.from_directory(folder)

    def bad_tf_config_edst():
        with _Env("TF_CONFIG", "{'cluster': 1}"):
            model = _small()
            model.compile(kft.SparseOptimizer(sgd(), sparsity=0.5), loss())
            edst = kft.EDSTCallback(num_members=1, exploration_epochs=0,
                                    refinement_epochs=1, save_best="loss",
                                    member_dir=str(tmp / "tfc"))
            model.fit(x, y, epochs=1, verbose=0, callbacks=[edst])

    def bad_tf_config_strategy():
        with _Env("TF_CONFIG", "cluster=worker0"):
            distributed.make_strategy("multi_worker")

    (tmp / "a_file").write_text("x")
    (tmp / "empty").mkdir(exist_ok=True)
    cases = [
        ("SparseOptimizer sparsity above 1",
         lambda: kft.SparseOptimizer(sgd(), sparsity=1.5), ["sparsity", "1.5"]),
        ("SparseOptimizer negative numpy sparsity",
         lambda: kft.SparseOptimizer(sgd(), sparsity=np.float32(-0.1)),
         ["sparsity", "-0.1"]),
        ("SparseOptimizer sparsity as a string",
         lambda: kft.SparseOptimizer(sgd(), sparsity="0.8"), ["sparsity", "'0.8'"]),
        ("SparseOptimizer sparsity NaN",
         lambda: kft.SparseOptimizer(sgd(), sparsity=float("nan")), ["sparsity", "nan"]),
        ("unknown distribution",
         lambda: kft.SparseOptimizer(sgd(), distribution="gaussian"),
         ["distribution", "gaussian"]),
        ("unknown grow rule",
         lambda: kft.SparseOptimizer(sgd(), grow="magic"), ["grow", "magic"]),
        ("drop_fraction 0",
         lambda: kft.SparseOptimizer(sgd(), drop_fraction=0.0), ["drop_fraction", "0.0"]),
        ("update_interval 0",
         lambda: kft.SparseOptimizer(sgd(), update_interval=0), ["update_interval", "0"]),
        ("inner optimizer given by name",
         lambda: kft.SparseOptimizer("sgd"), ["inner_optimizer", "'sgd'"]),
        ("unsupported inner optimizer (Ftrl)",
         lambda: kft.SparseOptimizer(keras.optimizers.Ftrl()), ["inner_optimizer", "Ftrl"]),
        ("inner optimizer with use_ema",
         lambda: kft.SparseOptimizer(keras.optimizers.SGD(use_ema=True)),
         ["use_ema", "True"]),
        ("model with no prunable kernel", no_prunable,
         ["no prunable weights", "batch_normalization"]),
        ("custom layer with an unmarked kernel", unmarked,
         ["no prunable weights", "custom/w", "prunable"]),
        ("EDSTCallback num_members 0",
         lambda: kft.EDSTCallback(num_members=0), ["num_members", "0"]),
        ("EDSTCallback global_drop_fraction 1.5",
         lambda: kft.EDSTCallback(global_drop_fraction=1.5),
         ["global_drop_fraction", "1.5"]),
        ("EDSTCallback empty member_dir",
         lambda: kft.EDSTCallback(member_dir=""), ["member_dir", "''"]),
        ("EDSTCallback on a model without SparseOptimizer",
         lambda: edst_on(sgd()), ["SparseOptimizer", "Sequential"]),
        ("EDST fit with too few epochs",
         lambda: edst_on(kft.SparseOptimizer(sgd(), sparsity=0.5), epochs=3),
         ["epochs=3", "6"]),
        ("train_dst_ensemble duplicate seeds",
         lambda: kft.train_dst_ensemble(_small, (x, y), num_members=2, seeds=[1, 1],
                                        batch_size=4),
         ["seeds", "[1, 1]"]),
        ("train_dst_ensemble member_index out of range",
         lambda: kft.train_dst_ensemble(_small, (x, y), num_members=2, member_index=5,
                                        batch_size=4),
         ["member_index", "5"]),
        ("member dir: architectures with different input shapes",
         from_dir(members_dir("arch", [_small(), conv()])),
         ["share input and output shapes", "(None, 8)", "(None, 4, 4, 1)"]),
        ("member dir: different numbers of classes",
         from_dir(members_dir("classes", [_small(classes=3), _small(classes=5)])),
         ["share input and output shapes", "(None, 3)", "(None, 5)"]),
        ("member dir: different input shapes",
         from_dir(members_dir("inputs", [_small(inputs=8), _small(inputs=9)])),
         ["share input and output shapes", "(None, 8)", "(None, 9)"]),
        ("member dir empty", from_dir(tmp / "empty"), ["No members found", "empty"]),
        ("member dir missing", from_dir(tmp / "nope"), ["not found", "nope"]),
        ("member dir is a file", from_dir(tmp / "a_file"), ["a_file", "a file is there"]),
        ("member dir unreadable", unreadable_dir, ["cannot be read", "unreadable"]),
        ("member dir with a member missing (being written)", from_dir(gap_dir()),
         ["waiting for member 1", "being written"]),
        ("member file truncated",
         lambda: members_lib.load_member(member_file("torn", truncate)),
         ["torn.kftm", "not a valid member file"]),
        ("member file of a newer format version",
         lambda: members_lib.load_member(member_file("future", future_format)),
         ["future.kftm", "format version 2"]),
        (".keras file saved by another keras_freetickets version",
         keras_file_from_other_version, ["SparseOptimizer", "mask_format"]),
        ("export path is a file",
         export_to(str(tmp / "a_file"), overwrite=True), ["path", "a_file", "file"]),
        ("export path inside a file",
         export_to(str(tmp / "a_file" / "1")), ["path", "a_file", "is a file"]),
        ("export overwrite not a bool",
         export_to(str(tmp / "x" / "1"), overwrite="yes"), ["overwrite", "'yes'"]),
        ("TF_CONFIG that does not parse (task_info)",
         lambda: _with_env("TF_CONFIG", "{cluster: }", distributed.task_info),
         ["TF_CONFIG", "{cluster: }"]),
        ("TF_CONFIG that does not parse (EDST candidates)", bad_tf_config_edst,
         ["TF_CONFIG", "{'cluster': 1}"]),
        ("TF_CONFIG that does not parse (make_strategy)", bad_tf_config_strategy,
         ["TF_CONFIG", "cluster=worker0"]),
        ("TF_CONFIG task index out of range",
         lambda: distributed.task_info({"cluster": {"worker": ["a:1"]},
                                        "task": {"type": "worker", "index": 4}}),
         ["task.index", "4"]),
        ("save_member metadata not JSON",
         lambda: members_lib.save_member(_small(), tmp / "m.kftm", metadata={"f": object()},
                                         overwrite=True),
         ["metadata", "object"]),
        ("save_member path is a folder",
         lambda: members_lib.save_member(_small(), tmp / "empty", overwrite=True),
         ["path", "empty", "folder"]),
        ("BackupAndRestore save_freq 0",
         lambda: kft.BackupAndRestore(str(tmp / "b"), save_freq=0), ["save_freq", "0"]),
        ("ensemble output kind unknown",
         lambda: kft.FreeTicketsEnsemble([_small()], output="softmax"),
         ["output", "softmax"]),
    ]
    return cases


def _with_env(name, value, fn):
    with _Env(name, value):
        return fn()


def check_error(fn, substrings):
    """Runs a malformed call; returns a record of how it failed."""
    import traceback

    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- the point is to see what comes out
        frames = traceback.extract_tb(e.__traceback__)
        deep = [f.filename for f in frames
                if f"site-packages{os.sep}tensorflow{os.sep}" in f.filename]
        message = str(e)
        missing = [s for s in substrings if s not in message]
        clean = isinstance(e, (ValueError, TypeError, OSError)) and not deep
        return dict(error=type(e).__name__, message=message[:400],
                    missing=missing, tf_frames=len(deep),
                    ok=clean and not missing)
    return dict(error=None, message="(no error raised)", missing=substrings,
                tf_frames=0, ok=False)


def inputs_faults(tmp):
    rows, records = [], []
    for fault, fn, substrings in malformed_cases(tmp):
        record = dict(fault=fault, **check_error(fn, substrings))
        records.append(record)
        rows.append(dict(
            fault_class="malformed input", fault=fault, trials=1,
            outcome=(f"{record['error']}: {record['message'][:110]}"
                     + ("" if record["ok"] else
                        f" [NOT CLEAR: missing {record['missing']}, "
                        f"{record['tf_frames']} TF frames]")),
            lost=0, half_written=0))
    return rows, records



# =========================================================================
# Numeric faults.
# =========================================================================
def _mask_facts(opt, old_masks):
    import numpy as np

    facts = dict(problems=opt.check_invariants(), grown_nan=0, inactive_nonzero=0,
                 counts_exact=True, active_nan=0)
    for layer, old in zip(opt.sparse_layers, old_masks):
        mask = layer.mask.numpy()
        weights = layer.variable.numpy()
        grown = mask & ~old
        facts["grown_nan"] += int(np.isnan(weights[grown]).sum())
        facts["inactive_nonzero"] += int(np.count_nonzero(weights[~mask]))
        facts["active_nan"] += int(np.isnan(weights[mask]).sum())
        facts["counts_exact"] &= int(mask.sum()) == layer.num_active
    return facts


def update_step_fault(what, grow):
    """A batch with NaN/Inf in the inputs or labels at a mask-update step."""
    import keras
    import numpy as np

    import keras_freetickets as kft

    model = _small(hidden=16)
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.05, momentum=0.9),
                              sparsity=0.7, update_interval=2, grow=grow, seed=0)
    model.compile(opt, keras.losses.CategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 16)]
    model.train_on_batch(x, y)  # step 0
    model.train_on_batch(x, y)  # step 1 (step 2 is an update step)
    old = [layer.mask.numpy() for layer in opt.sparse_layers]
    updates = int(opt.mask_updates.numpy())
    bad_x, bad_y = x.copy(), y.copy()
    value = {"nan": np.nan, "inf": np.inf}[what.split()[0]]
    if what.endswith("inputs"):
        bad_x[0, 0] = value
    else:
        bad_y[0, 0] = value
    loss = float(np.asarray(model.train_on_batch(bad_x, bad_y)))
    facts = _mask_facts(opt, old)
    facts.update(loss=repr(loss), updates_run=int(opt.mask_updates.numpy()) - updates,
                 masks_changed=any((l.mask.numpy() != o).any()
                                   for l, o in zip(opt.sparse_layers, old)))
    facts["ok"] = (not facts["problems"] and facts["counts_exact"]
                   and facts["grown_nan"] == 0 and facts["inactive_nonzero"] == 0
                   and facts["updates_run"] == 1)
    return facts


def overflow_fault(overflow_steps, steps=6):
    """mixed_float16: batches at `overflow_steps` (0-based batch numbers)
    overflow, so LossScaleOptimizer skips them. Returns the step counter and
    mask-update count after each batch."""
    import keras
    import numpy as np

    import keras_freetickets as kft

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3, dtype="float32")])
        opt = kft.SparseOptimizer(keras.optimizers.SGD(0.05), sparsity=0.7,
                                  update_interval=2, seed=0)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(True))
        rng = np.random.default_rng(0)
        x = rng.normal(size=(16, 8)).astype("float32")
        y = rng.integers(0, 3, 16)
        trace = []
        for batch in range(steps):
            old = [layer.mask.numpy() for layer in opt.sparse_layers]
            xb = x * 1e6 if batch in overflow_steps else x
            loss = float(np.asarray(model.train_on_batch(xb, y)))
            facts = _mask_facts(opt, old)
            trace.append(dict(batch=batch, loss=repr(loss),
                              applied_steps=int(opt.iterations.numpy()),
                              mask_updates=int(opt.mask_updates.numpy()),
                              loss_scale=float(model.optimizer.dynamic_scale.numpy()),
                              problems=facts["problems"],
                              counts_exact=facts["counts_exact"],
                              nan_weights=facts["active_nan"] + facts["grown_nan"]))
        return dict(optimizer=type(model.optimizer).__name__, trace=trace)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def terminate_on_nan_fault(tmp, nan_epoch):
    """EDSTCallback + kft.BackupAndRestore + TerminateOnNaN, NaN inputs in
    one batch of epoch `nan_epoch`."""
    import keras
    import numpy as np

    import keras_freetickets as kft
    from keras_freetickets import members as members_lib

    tmp = pathlib.Path(tmp) / f"terminate_{nan_epoch}"
    model = _small(hidden=16)
    opt = kft.SparseOptimizer(keras.optimizers.SGD(0.05), sparsity=0.7,
                              update_interval=2, seed=0)
    model.compile(opt, keras.losses.SparseCategoricalCrossentropy(True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8)).astype("float32")
    y = rng.integers(0, 3, 32)
    edst = kft.EDSTCallback(num_members=2, exploration_epochs=1, refinement_epochs=2,
                            member_dir=str(tmp / "members"), quiet_steps=1)
    backup = kft.BackupAndRestore(str(tmp / "backup"))

    class Poison(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == nan_epoch:  # as a NaN batch would leave them
                model.layers[-1].bias.assign(np.full(3, np.nan, "float32"))

    history = model.fit(x, y, batch_size=8, epochs=edst.total_epochs, shuffle=False,
                        verbose=0, callbacks=[edst, backup, Poison(),
                                              keras.callbacks.TerminateOnNaN()])
    restored = _small(hidden=16)
    # Configured as the EDST run was (its callback turns global exploration
    # on); otherwise the backup refuses to restore into it.
    restored.compile(kft.SparseOptimizer(keras.optimizers.SGD(0.05), sparsity=0.7,
                                         update_interval=2, seed=0,
                                         global_exploration=True),
                     keras.losses.SparseCategoricalCrossentropy(True))

    class FirstEpoch(keras.callbacks.Callback):
        """Notes the epoch the resumed fit starts at and the restored
        weights, then ends the fit before it trains a step."""

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            self.finite = all(np.isfinite(w).all() for w in self.model.get_weights())
            raise _ResumeSeen

    first = FirstEpoch()
    try:
        restored.fit(x, y, batch_size=8, epochs=edst.total_epochs, shuffle=False,
                     verbose=0, callbacks=[kft.BackupAndRestore(str(tmp / "backup")),
                                           first])
    except _ResumeSeen:
        pass
    finite = first.finite
    nan_members = []
    if (tmp / "members").exists():
        for path in sorted((tmp / "members").glob("member_*.kftm")):
            arrays = members_lib.read_member_weights(path)
            if any(np.isnan(a).any() for a in arrays.values()):
                nan_members.append(path.name)
    return dict(epochs_run=history.epoch, stopped=len(history.epoch) < edst.total_epochs,
                backup_epoch=first.epoch, backup_finite=finite,
                nan_members=nan_members,
                ok=(len(history.epoch) == nan_epoch + 1 and finite
                    and first.epoch == nan_epoch and not nan_members))


class _ResumeSeen(Exception):
    """Ends a resumed fit at its first epoch (see `terminate_on_nan_fault`)."""


def numeric_faults(tmp):
    rows, records = [], []
    for what in ("nan inputs", "inf inputs", "nan labels", "inf labels"):
        for grow in ("gradient", "random"):
            facts = update_step_fault(what, grow)
            records.append(dict(fault=f"{what} at a mask update ({grow})", **facts))
            rows.append(dict(
                fault_class="numeric",
                fault=f"{what.split()[0].upper()} in the {what.split()[1]} of a mask-update "
                      f"step, grow={grow}",
                trials=1,
                outcome=(f"loss {facts['loss']}; update ran {facts['updates_run']}x; "
                         f"exact counts: {facts['counts_exact']}; NaN grown: "
                         f"{facts['grown_nan']}; inactive nonzero: "
                         f"{facts['inactive_nonzero']}; invariants: "
                         f"{facts['problems'] or 'ok'}"),
                lost=0 if facts["ok"] else 1, half_written=0))
    for overflow_steps, label in (((2,), "on the batch due for a mask update"),
                                  ((1,), "on an ordinary batch")):
        result = overflow_fault(overflow_steps)
        trace = result["trace"]
        steps = [t["applied_steps"] for t in trace]
        updates = [t["mask_updates"] for t in trace]
        # Updates are due at applied steps 2, 4, ...: each must run exactly
        # once, on the first applied step with that number.
        expected = [sum(1 for s in range(n) if s >= 2 and s % 2 == 0) for n in steps]
        ok = (updates == expected and all(t["counts_exact"] and not t["problems"]
                                          and t["nan_weights"] == 0 for t in trace)
              and steps[overflow_steps[0]] == steps[overflow_steps[0] - 1])
        records.append(dict(fault=f"mixed_float16 overflow {label}", ok=ok,
                            expected_updates=expected, **result))
        rows.append(dict(
            fault_class="numeric",
            fault=f"mixed_float16 loss overflow {label} (LossScaleOptimizer skips it)",
            trials=1,
            outcome=(f"{result['optimizer']}: applied steps {steps}, mask updates "
                     f"{updates} after each batch: the skipped batch does not count "
                     "as a step, the due update runs once on the next applied step; "
                     f"exact counts and no NaN: {ok}"),
            lost=0 if ok else 1, half_written=0))
    for nan_epoch, label in ((1, "an exploration epoch"), (2, "a member's last epoch")):
        facts = terminate_on_nan_fault(tmp, nan_epoch)
        records.append(dict(fault=f"TerminateOnNaN, NaN in {label}", **facts))
        rows.append(dict(
            fault_class="numeric",
            fault=f"TerminateOnNaN beside EDSTCallback + kft.BackupAndRestore, NaN in {label}",
            trials=1,
            outcome=(f"stopped after epochs {facts['epochs_run']}; backup kept epoch "
                     f"{facts['backup_epoch']} (finite: {facts['backup_finite']}); "
                     f"NaN member files: {facts['nan_members'] or 'none'}"),
            lost=0 if facts["ok"] else 1, half_written=len(facts["nan_members"])))
    return rows, records



# =========================================================================
# Storage faults.
# =========================================================================
def _tree_hash(folder):
    digest = hashlib.sha256()
    for path in sorted(pathlib.Path(folder).rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _leftovers(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir()
                  if ".tmp" in p.name or ".old-" in p.name)


class _FailAfter:
    """A stand-in for a writer call that fails with `errno` on call `n`
    (`as_function()` to replace a method on a class)."""

    def as_function(self):
        def call(*args, **kwargs):
            return self(*args, **kwargs)
        return call

    def __init__(self, real, n, errno_, before=True):
        self.real, self.n, self.errno, self.before = real, n, errno_, before
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            if not self.before:
                self.real(*args, **kwargs)
            raise OSError(self.errno, os.strerror(self.errno))
        return self.real(*args, **kwargs)


class _OwnLibc:
    """A stand-in for `ctypes.CDLL` that fakes the process's own C library
    (`CDLL(None)`), where the export finds `renameat2`: with `errno_=None` it
    cannot be opened (the export then replaces an old version in two
    renames), otherwise its renameat2 fails with `errno_`. Other libraries
    load as usual."""

    def __init__(self, real, errno_=None):
        self.real, self.errno = real, errno_

    def __call__(self, name, *args, **kwargs):
        if name is not None:
            return self.real(name, *args, **kwargs)
        if self.errno is None:
            raise OSError("no renameat2 here (fault injection)")
        import ctypes
        import types

        def renameat2(*call_args):
            ctypes.set_errno(self.errno)
            return -1

        return types.SimpleNamespace(renameat2=renameat2)


def storage_faults(tmp):
    import ctypes
    import errno
    import zipfile

    import keras
    import numpy as np
    import tensorflow as tf

    import keras_freetickets as kft
    from keras_freetickets import members as members_lib

    tmp = pathlib.Path(tmp) / "storage"
    tmp.mkdir(parents=True, exist_ok=True)
    rows, records = [], []
    old_model, new_model = _small(seed=0), _small(seed=1)
    probe = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")

    def row(fault, record):
        records.append(dict(fault=fault, ok=record["intact"] and not record["leftovers"],
                            **record))
        rows.append(dict(fault_class="storage", fault=fault, trials=1,
                         outcome=record["outcome"],
                         lost=0 if record["intact"] else 1,
                         half_written=len(record["leftovers"])))

    def member_case(fault, target, patch_obj, patch_name, n, errno_, before=True):
        path = tmp / f"{target}.kftm"
        if target == "overwrite":
            members_lib.save_member(old_model, path, overwrite=True)
        before_bytes = path.read_bytes() if path.exists() else None
        real = getattr(patch_obj, patch_name)
        with _Patched(patch_obj, patch_name,
                      _FailAfter(real, n, errno_, before).as_function()):
            try:
                members_lib.save_member(new_model, path, overwrite=True)
                error = None
            except OSError as e:
                error = e
        if before_bytes is None:
            intact = not path.exists()
        else:
            intact = path.read_bytes() == before_bytes and np.array_equal(
                members_lib.load_member(path).predict(probe, verbose=0),
                old_model.predict(probe, verbose=0))
        said = error is not None and error.errno == errno_ and str(path) in str(error)
        row(fault, dict(intact=intact and said, leftovers=_leftovers(tmp),
                        error=str(error), outcome=(
                            f"{type(error).__name__}: {error}; "
                            + ("old file intact and loadable" if before_bytes
                               else "no file created"))))

    member_case("ENOSPC midway through a new member file (3rd zip entry)", "new",
                zipfile.ZipFile, "writestr", 3, errno.ENOSPC)
    member_case("ENOSPC midway through overwriting a member file", "overwrite",
                zipfile.ZipFile, "writestr", 4, errno.ENOSPC)
    member_case("EIO on fsync of a member file being overwritten", "overwrite",
                os, "fsync", 1, errno.EIO)
    member_case("EIO on the rename that replaces a member file", "overwrite",
                os, "replace", 1, errno.EIO)

    ensemble = kft.FreeTicketsEnsemble([old_model, new_model])
    old_export = tmp / "serving" / "1"
    ensemble.export(str(old_export))
    reference = tf.saved_model.load(str(old_export)).signatures["serving_default"](
        inputs=tf.constant(probe))["probabilities"].numpy()
    old_hash = _tree_hash(old_export)

    def export_case(fault, overwrite_existing, patch_obj, patch_name, n, errno_,
                    before=True, tf_error=False, no_exchange=False, swap_error=False):
        path = old_export if overwrite_existing else tmp / "serving" / "2"
        real = getattr(patch_obj, patch_name)
        fail = _FailAfter(real, n, errno_, before).as_function()
        if swap_error:  # the C library's renameat2 fails with `errno_`
            fail = _OwnLibc(real, errno_)
        if tf_error:
            def fail_in_tf(*args, **kwargs):  # TF's own error type
                real(*args, **kwargs)
                raise tf.errors.ResourceExhaustedError(
                    None, None, "variables.data: No space left on device")
            fail = fail_in_tf
        import contextlib

        with contextlib.ExitStack() as stack:
            if no_exchange:  # a system without renameat2's exchange
                stack.enter_context(_Patched(ctypes, "CDLL", _OwnLibc(ctypes.CDLL)))
            stack.enter_context(_Patched(patch_obj, patch_name, fail))
            try:
                ensemble.export(str(path), overwrite=overwrite_existing)
                error = None
            except (OSError, tf.errors.OpError) as e:
                error = e
        if overwrite_existing:
            served = tf.saved_model.load(str(path)).signatures["serving_default"](
                inputs=tf.constant(probe))["probabilities"].numpy()
            intact = _tree_hash(path) == old_hash and np.array_equal(served, reference)
        else:
            intact = not path.exists()
        said = error is not None and str(path) in str(error) and "failed" in str(error)
        row(fault, dict(intact=intact and said,
                        leftovers=_leftovers(path.parent), error=str(error),
                        outcome=(f"{type(error).__name__}: {str(error)[:200]}; "
                                 + ("old export intact, loads and serves the same"
                                    if overwrite_existing else "no folder created"))))

    # ExportArchive.write_out ends in tf.saved_model.save: the failure comes
    # after it wrote its files, as a full disk would at its last write.
    export_case("ENOSPC after the SavedModel was partly written (new export)", False,
                tf.saved_model, "save", 1, errno.ENOSPC, before=False)
    export_case("TF ResourceExhaustedError while writing variables (new export)",
                False, tf.saved_model, "save", 1, errno.ENOSPC, tf_error=True)
    export_case("ENOSPC midway through overwriting an export", True,
                tf.saved_model, "save", 1, errno.ENOSPC, before=False)
    export_case("EIO on the atomic swap of the new and the old export (overwrite)",
                True, ctypes, "CDLL", 1, errno.EIO, swap_error=True)
    export_case("EIO moving the old export aside (overwrite, two-rename fallback)",
                True, os, "rename", 1, errno.EIO, no_exchange=True)
    export_case("EIO renaming the new export into place (overwrite, two-rename "
                "fallback)", True, os, "rename", 2, errno.EIO, no_exchange=True)

    from keras_freetickets import backup as backup_lib

    model = _small()
    model.compile(kft.SparseOptimizer(keras.optimizers.SGD(0.1), sparsity=0.5),
                  keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(probe, np.zeros(4, "int64"), verbose=0)
    folder = tmp / "backup"
    backup_lib.write_checkpoint(model, folder, {"epoch": 1})
    old_hash = _tree_hash(folder)
    # The first fsync of a checkpoint is the one of its metadata file, the
    # last file written into the temporary checkpoint folder.
    with _Patched(os, "fsync", _FailAfter(os.fsync, 1, errno.ENOSPC).as_function()):
        try:
            backup_lib.write_checkpoint(model, folder, {"epoch": 2})
            error = None
        except OSError as e:
            error = e
    intact = _tree_hash(folder) == old_hash and error is not None and str(folder) in str(error)
    row("ENOSPC writing a kft.BackupAndRestore checkpoint", dict(
        intact=intact, leftovers=_leftovers(folder), error=str(error),
        outcome=f"{type(error).__name__}: {error}; previous checkpoint intact"))
    return rows, records



# =========================================================================
# Concurrency.
# =========================================================================
def reader_during_rewrites(tmp, rewrites=30):
    """A thread rewrites member 1 again and again (two different models, in
    turn) while this thread reads the folder: every read must see complete
    members, each equal to one of the two models."""
    import threading

    import numpy as np

    from keras_freetickets import members as members_lib

    folder = pathlib.Path(tmp) / "rewrites"
    models = [_small(seed=0), _small(seed=1)]
    members_lib.save_member(models[0], members_lib.member_path(folder, 0), overwrite=True)
    members_lib.save_member(models[0], members_lib.member_path(folder, 1), overwrite=True)
    expected = [[np.asarray(w) for w in m.get_weights()] for m in models]
    done = threading.Event()

    def writer():
        try:
            for i in range(rewrites):
                members_lib.save_member(models[i % 2], members_lib.member_path(folder, 1),
                                        overwrite=True)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads = torn = errors = 0
    messages = set()
    while not done.is_set() or reads == 0:
        try:
            for path in members_lib.list_members(folder):
                arrays = list(members_lib.read_member_weights(path).values())
                if not any(len(arrays) == len(e) and all(
                        np.array_equal(a, b) for a, b in zip(arrays, e)) for e in expected):
                    torn += 1
            reads += 1
        except Exception as e:  # noqa: BLE001
            errors += 1
            messages.add(f"{type(e).__name__}: {e}"[:200])
    thread.join()
    leftovers = _leftovers(folder)
    return dict(reads=reads, torn=torn, errors=errors, messages=sorted(messages),
                rewrites=rewrites, leftovers=leftovers,
                ok=reads > 0 and torn == 0 and errors == 0 and not leftovers)


def dst_workers_into_one_folder(root, reference_members=None, timeout_s=300):
    """Three processes train the three DST members into one folder (one
    `member_index` each) while this process polls the folder."""
    from keras_freetickets import members as members_lib

    work_dir = pathlib.Path(root) / "dst_workers"
    args = [[sys.executable, str(pathlib.Path(__file__).resolve()), "--worker=dst",
             f"--work_dir={work_dir}", f"--member_index={i}"]
            for i in range(DST["num_members"])]
    procs = [subprocess.Popen(a, env=child_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, cwd=str(REPO)) for a in args]
    polls, outcomes = 0, {}
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        polls += 1
        try:
            paths = members_lib.list_members(work_dir / "members")
            for path in paths:
                members_lib.read_member_weights(path)
            key = f"complete members {len(paths)}"
        except FileNotFoundError:
            key = "no folder yet"
        except ValueError as e:
            text = str(e)
            key = ("waiting for member " + text.split("waiting for member ")[1].split(" ")[0]
                   if "waiting for member" in text else text.split(" (")[0][:60])
            key = "No members found" if text.startswith("No members found") else key
        except Exception as e:  # noqa: BLE001 -- a torn read would land here
            key = f"UNEXPECTED {type(e).__name__}: {e}"[:120]
        outcomes[key] = outcomes.get(key, 0) + 1
        time.sleep(0.2)
    codes = []
    for proc in procs:
        try:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
        codes.append(proc.returncode)
    snap = snapshot(work_dir)
    equal = (reference_members is None
             or snap["members"] == reference_members)
    unexpected = [k for k in outcomes if k.startswith("UNEXPECTED")]
    return dict(returncodes=codes, polls=polls, outcomes=outcomes,
                members=sorted(snap["members"]),
                equal_to_single_process=equal if reference_members else None,
                leftovers=[x for x in snap["leftovers"] if not x.startswith("backup")],
                ok=codes == [0] * len(codes) and not unexpected and equal
                and sorted(snap["members"]) == [f"member_{i}.kftm"
                                                for i in range(DST["num_members"])])


def concurrency_faults(tmp, root=None, reference_members=None, processes=True):
    from keras_freetickets import members as members_lib

    rows, records = [], []
    result = reader_during_rewrites(tmp)
    records.append(dict(fault="reader while member 1 is rewritten", **result))
    rows.append(dict(
        fault_class="concurrency",
        fault="reader loads the member folder while a writer rewrites member 1",
        trials=result["reads"],
        outcome=(f"{result['reads']} reads during {result['rewrites']} rewrites: "
                 f"{result['torn']} torn, {result['errors']} errors"),
        lost=result["torn"] + result["errors"], half_written=len(result["leftovers"])))
    folder = pathlib.Path(tmp) / "writing"
    for i in (0, 2):
        members_lib.save_member(_small(), members_lib.member_path(folder, i), overwrite=True)
    (folder / ".member_1.kftm.5f3a.tmp").write_bytes(b"PK\x03\x04")
    record = check_error(lambda: members_lib.list_members(folder),
                         ["waiting for member 1", "being written"])
    records.append(dict(fault="reader while member 1 is being written", **record))
    rows.append(dict(
        fault_class="concurrency",
        fault="ensemble loaded while member 1 is being written (members 0 and 2 there)",
        trials=1, outcome=f"{record['error']}: {record['message'][:140]}",
        lost=0 if record["ok"] else 1, half_written=0))
    if processes:
        result = dst_workers_into_one_folder(root or tmp, reference_members)
        records.append(dict(fault="three DST worker processes, one folder", **result))
        rows.append(dict(
            fault_class="concurrency",
            fault="3 processes write the members of one DST ensemble into one folder "
                  "(member_index 0, 1, 2) while a reader polls it",
            trials=result["polls"],
            outcome=(f"exit codes {result['returncodes']}; reader saw "
                     + ", ".join(f"{k}: {v}" for k, v in sorted(result["outcomes"].items()))
                     + f"; members equal to a single-process run: "
                       f"{result['equal_to_single_process']}"),
            lost=0 if result["ok"] else 1, half_written=len(result["leftovers"])))
    return rows, records


# =========================================================================
# Serving inputs.
# =========================================================================
SERVING_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf

path, features = sys.argv[1], int(sys.argv[2])
loaded = tf.saved_model.load(path)
serve = loaded.signatures["serving_default"]
members = loaded.signatures["members"]
rng = np.random.default_rng(0)
good = rng.normal(size=(5, features)).astype("float32")
reference = serve(inputs=tf.constant(good))["probabilities"].numpy()
nan_rows = good.copy(); nan_rows[1, 0] = np.nan; nan_rows[3, :] = np.inf
large = np.tile(good, (40000, 1))
cases = {
    "float64 tensor": lambda: serve(inputs=tf.constant(good, tf.float64)),
    "int32 tensor": lambda: serve(inputs=tf.constant(good.astype("int32"))),
    "string tensor": lambda: serve(inputs=tf.constant([["a"] * features])),
    "rank 1 (one example without batch axis)": lambda: serve(inputs=tf.constant(good[0])),
    "rank 3": lambda: serve(inputs=tf.constant(good[:, :, None])),
    "wrong width": lambda: serve(inputs=tf.constant(good[:, :-1])),
    "wrong width (members signature)": lambda: members(inputs=tf.constant(good[:, :-1])),
    "scalar": lambda: serve(inputs=tf.constant(1.0)),
    "batch 0": lambda: serve(inputs=tf.zeros([0, features])),
    "NaN and Inf values in two rows": lambda: serve(inputs=tf.constant(nan_rows)),
    "very large batch (200000 rows)": lambda: serve(inputs=tf.constant(large)),
}
results = {}
for name, call in cases.items():
    try:
        out = call()
        probs = out["probabilities"].numpy()
        info = dict(outcome="served", shape=list(probs.shape))
        if name.startswith("NaN"):
            clean = [0, 2, 4]
            info["clean_rows_equal"] = bool(np.array_equal(probs[clean], reference[clean]))
            info["bad_rows"] = ("NaN" if np.isnan(probs[[1, 3]]).all() else
                                "finite" if np.isfinite(probs[[1, 3]]).all() else "mixed")
        if name.startswith("very large"):
            info["max_diff"] = float(np.abs(probs[:5] - reference).max())
            info["rows_equal"] = bool(np.allclose(probs.reshape(40000, 5, -1),
                                                  reference[None], atol=1e-6))
    except Exception as e:
        lines = [l for l in str(e).strip().splitlines() if l.strip()] or [""]
        line = next((l for l in lines if "inputs must have shape" in l), lines[0])
        info = dict(outcome="rejected", error=type(e).__name__, message=line.strip()[:240])
    results[name] = info
after = serve(inputs=tf.constant(good))["probabilities"].numpy()
print(json.dumps(dict(
    results=results, alive_after=bool(np.array_equal(after, reference)),
    keras_freetickets_imported="keras_freetickets" in sys.modules)))
"""

EXPECTED_SERVING = {
    "float64 tensor": "rejected", "int32 tensor": "rejected", "string tensor": "rejected",
    "rank 1 (one example without batch axis)": "rejected", "rank 3": "rejected",
    "wrong width": "rejected", "wrong width (members signature)": "rejected",
    "scalar": "rejected", "batch 0": "served",
    "NaN and Inf values in two rows": "served",
    "very large batch (200000 rows)": "served",
}


def export_tiny(folder):
    import keras_freetickets as kft

    ensemble = kft.FreeTicketsEnsemble([_small(seed=0), _small(seed=1)])
    return ensemble.export(str(folder), overwrite=True)


def serving_faults(tmp, cli=True, timeout_s=900):
    tmp = pathlib.Path(tmp)
    path = export_tiny(tmp / "serving" / "1")
    env = child_env(threads=2)
    env["PYTHONPATH"] = ""  # this process must not find keras_freetickets
    proc = subprocess.run([sys.executable, "-c", SERVING_SCRIPT, path, "8"],
                          env=env, capture_output=True, text=True,
                          timeout=timeout_s, cwd="/")
    rows, records = [], []
    if proc.returncode != 0:
        rows.append(dict(fault_class="serving", fault="fresh serving process",
                         trials=1, outcome=f"crashed: {proc.stderr[-300:]}",
                         lost=1, half_written=0))
        return rows, [dict(fault="fresh process", stderr=proc.stderr[-3000:], ok=False)]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, info in report["results"].items():
        ok = info["outcome"] == EXPECTED_SERVING[name] and report["alive_after"]
        if info["outcome"] == "rejected":
            ok &= info["error"] in ("InvalidArgumentError", "TypeError", "ValueError")
            if "rank" in name or "width" in name or name == "scalar":
                ok &= "inputs must have shape" in info["message"]
        if name.startswith("NaN"):
            ok &= info["clean_rows_equal"]
        if name.startswith("very large"):
            ok &= info["rows_equal"]
        records.append(dict(fault=name, ok=bool(ok), **info))
        detail = (f"rejected, {info['error']}: {info['message'][:150]}"
                  if info["outcome"] == "rejected" else
                  f"served, shape {info['shape']}" + (
                      f"; the other rows bit-identical to a clean batch: "
                      f"{info['clean_rows_equal']}; the NaN/Inf rows' outputs: "
                      f"{info['bad_rows']}" if name.startswith("NaN")
                      else "") + (f"; max diff to batch 5: {info['max_diff']:.1e}"
                                  if name.startswith("very large") else ""))
        rows.append(dict(fault_class="serving",
                         fault=f"request with {name} (fresh process, no keras_freetickets)",
                         trials=1, outcome=detail + (
                             "; process served the next good request" if report["alive_after"]
                             else "; PROCESS BROKEN"),
                         lost=0 if ok else 1, half_written=0))
    records.append(dict(fault="imports", ok=not report["keras_freetickets_imported"],
                        keras_freetickets_imported=report["keras_freetickets_imported"]))
    cli_path = pathlib.Path(sys.executable).parent / "saved_model_cli"
    if cli and cli_path.exists():
        import numpy as np

        for name, shape, expect in (
                ("good request", (2, 8), 0),
                ("wrong width", (2, 7), 1),
                ("rank 3", (2, 8, 1), 1)):
            expr = f"inputs=<float32 npy of shape {shape}>"
            npy = tmp / f"request_{len(shape)}_{shape[1]}.npy"
            np.save(npy, np.zeros(shape, np.float32))
            try:
                run = subprocess.run(
                    [str(cli_path), "run", "--dir", path, "--tag_set", "serve",
                     "--signature_def", "serving_default", "--inputs", f"inputs={npy}"],
                    env=env, capture_output=True, text=True, timeout=timeout_s, cwd="/")
            except subprocess.TimeoutExpired:
                # The harness gave up (a loaded machine), not the model.
                records.append(dict(fault=f"saved_model_cli {name}", ok=None,
                                    returncode=None, timed_out=timeout_s))
                rows.append(dict(fault_class="serving",
                                 fault=f"saved_model_cli run, {name} ({expr})", trials=0,
                                 outcome=f"not measured: no answer within {timeout_s} s",
                                 lost=0, half_written=0))
                continue
            text = run.stdout + run.stderr
            if expect == 0:
                ok = run.returncode == 0 and "probabilities" in text
                detail = f"exit 0, outputs printed: {ok}"
            else:
                ok = run.returncode not in (0,) and run.returncode > 0 and (
                    "inputs must have shape" in text)
                line = next((l for l in text.splitlines() if "inputs must have shape" in l), "")
                detail = f"exit {run.returncode}: {line.strip()[:150]}"
            records.append(dict(fault=f"saved_model_cli {name}", ok=ok,
                                returncode=run.returncode))
            rows.append(dict(fault_class="serving",
                             fault=f"saved_model_cli run, {name} ({expr})",
                             trials=1, outcome=detail, lost=0 if ok else 1,
                             half_written=0))
    return rows, records



# =========================================================================
# The campaign and its report.
# =========================================================================
def _versions():
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_freetickets as kft

    return dict(python=platform.python_version(), tensorflow=tf.__version__,
                keras=keras.__version__, numpy=np.__version__,
                keras_freetickets=kft.__version__)


def summary_counts(rows):
    """Per fault class: rows, trials, rows with something lost or left."""
    counts = {}
    for row in rows:
        c = counts.setdefault(row["fault_class"], dict(faults=0, trials=0, lost=0,
                                                        half_written=0))
        c["faults"] += 1
        c["trials"] += row["trials"]
        c["lost"] += int(row["lost"] > 0)
        c["half_written"] += int(row["half_written"] > 0)
    return counts


def write_report(out_dir, rows, details, settings, seconds):
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = summary_counts(rows)
    record = dict(
        benchmark="faults", date=benchkit.utc_now(),
        machine=platform.machine(), cpu_count=os.cpu_count(), versions=_versions(),
        command=benchkit.command_line("faults"),
        settings=settings, wall_seconds=round(seconds, 1), summary=counts,
        rows=rows, details=details)
    (out_dir / "faults.json").write_text(json.dumps(record, indent=1, default=str))
    lines = [
        "# Fault matrix (`benchmarks/faults.py`)", "",
        f"Run {record['date']} on {record['cpu_count']} CPUs, "
        f"TF {record['versions']['tensorflow']}, Keras {record['versions']['keras']}; "
        f"{seconds / 60:.1f} min. Command: `{record['command'].strip()}`.", "",
        "Lost = rows where a member, an export, a checkpoint or a served answer came "
        "out wrong or missing, or an error was not clear; left = rows that left a "
        "temporary or partial file behind.", "",
        "| fault class | faults | trials | rows with something lost | rows that left files |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, c in counts.items():
        lines.append(f"| {name} | {c['faults']} | {c['trials']} | {c['lost']} | "
                     f"{c['half_written']} |")
    lines += ["", "| class | fault | trials | outcome | lost | left |",
              "|---|---|---:|---|---:|---:|"]
    for row in rows:
        outcome = str(row["outcome"]).replace("|", "/").replace("\n", " ")
        lines.append(f"| {row['fault_class']} | {row['fault']} | {row['trials']} | "
                     f"{outcome} | {row['lost']} | {row['half_written']} |")
    (out_dir / "faults.md").write_text("\n".join(lines) + "\n")
    return record


def run_campaign():
    import shutil
    import tempfile

    start = time.monotonic()
    work = pathlib.Path(FLAGS.work_dir or tempfile.mkdtemp(prefix="kft_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    rows, details = [], {}
    reference_members = None
    merged = {}
    for path in FLAGS.merge_json:
        earlier = json.loads(pathlib.Path(path).read_text())
        for name in earlier["details"]:
            if name in FLAGS.classes and name not in merged:
                merged[name] = dict(
                    rows=[r for r in earlier["rows"] if r["fault_class"] == ROW_CLASS[name]],
                    details=earlier["details"][name],
                    source=dict(file=str(path), command=earlier["command"],
                                date=earlier["date"], wall_seconds=earlier["wall_seconds"]))
    if FLAGS.dst_reference:
        folder = pathlib.Path(FLAGS.dst_reference)
        reference_members = {p.name: sha256(p) for p in sorted(folder.glob("member_*.kftm"))}
    if "kills" in merged:
        rows += merged["kills"]["rows"]
        details["kills"] = merged["kills"]["details"]
    elif "kills" in FLAGS.classes and FLAGS.kill_trials:
        kill_rows, info = kill_campaign(work / "kills", FLAGS.kill_trials, FLAGS.seed,
                                        FLAGS.trial_timeout_s, parallel=FLAGS.parallel,
                                        deadline_s=FLAGS.deadline_s,
                                        reverse=FLAGS.reverse)
        rows += kill_rows
        details["kills"] = info
        reference_members = reference_members or info["references"].get(
            "dst", {}).get("members")
        print(f"kills: {len(info['trials'])} trials", flush=True)
    steps = (("inputs", lambda: inputs_faults(work / "inputs")),
             ("numeric", lambda: numeric_faults(work / "numeric")),
             ("storage", lambda: storage_faults(work / "storage")),
             ("concurrency", lambda: concurrency_faults(
                 work / "concurrency", reference_members=reference_members)),
             ("serving", lambda: serving_faults(work / "serving")))
    for name, step in steps:
        if name in merged:
            rows += merged[name]["rows"]
            details[name] = merged[name]["details"]
        elif name in FLAGS.classes:
            (work / name).mkdir(parents=True, exist_ok=True)
            class_rows, records = step()
            rows += class_rows
            details[name] = records
            print(f"{name}: {len(class_rows)} rows, "
                  f"{sum(r['lost'] > 0 for r in class_rows)} with something lost",
                  flush=True)
            write_report(FLAGS.out_dir, rows, details, dict(partial=True),
                         time.monotonic() - start)  # keep what is done
    settings = dict(merged_from={k: v["source"] for k, v in merged.items()},
                    kill_trials=FLAGS.kill_trials, seed=FLAGS.seed,
                    deadline_s=FLAGS.deadline_s,
                    parallel=FLAGS.parallel,
                    classes=FLAGS.classes, edst=EDST, dst=DST,
                    model=f"MLP {FEATURES}-{HIDDEN}-{CLASSES_N}",
                    examples=EXAMPLES, batch=BATCH, update_interval=UPDATE_INTERVAL)
    record = write_report(FLAGS.out_dir, rows, details, settings,
                          time.monotonic() - start)
    print(json.dumps(record["summary"], indent=1))
    if not FLAGS.work_dir:
        shutil.rmtree(work, ignore_errors=True)


def main(argv):
    del argv
    validate_flags()
    if FLAGS.worker:
        run_worker(FLAGS.worker, FLAGS.work_dir, FLAGS.member_index)
        return
    run_campaign()


if __name__ == "__main__":
    define_flags()
    app.run(main)
