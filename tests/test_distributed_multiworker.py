"""keras_freetickets.distributed: fit on 2 workers, a dead worker, DST members.

Two clusters of 2 worker processes on 127.0.0.1 (`TF_CONFIG`, ports bound to
0, one thread per process) run per test session, each with hard timeouts
that kill the process groups:

1. `tests/scripts/mwms_worker.py` trains a sparse MLP with random (SET) and
   gradient (RigL) growth, one after the other, for 256 steps each, next to
   a 1-worker reference run with the same global batch.
2. The gradient run again with per-worker kft.BackupAndRestore: worker 1 is
   SIGKILLed mid-training, the survivor must exit with an error by itself,
   and the restarted cluster must end exactly where the uninterrupted run of
   cluster 1 ended.

Meanwhile 2 independent processes train one DST member each into one
folder (no strategy), and the ensemble is assembled. The helpers of the module
(TF_CONFIG parsing, ChiefOnly, wait_for_members, prepare_model) are tested
in-process.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "scripts"
WORKER = SCRIPTS / "mwms_worker.py"
DST_MEMBER = SCRIPTS / "mwms_dst_member.py"
GROWS = ("random", "gradient")
RUNS = GROWS + ("edst",)  # the EDST run grows by gradient
CLUSTER_TIMEOUT_S = 240  # one cluster, start to finish
SURVIVOR_BOUND_S = 90  # a survivor must notice a dead worker by then
# 63 steps an epoch; the last batch holds 32 examples, 16 per worker (an
# unevenly split batch would weigh the workers' examples differently from
# one worker: Keras averages the per-worker mean losses).
EPOCHS, EXAMPLES, GLOBAL_BATCH, INTERVAL = 4, 4000, 64, 10
STEPS_PER_EPOCH = -(-EXAMPLES // GLOBAL_BATCH)
STEPS = EPOCHS * STEPS_PER_EPOCH
PAUSE_STEP = 150  # in epoch 3 of 4: epochs 1-2 are backed up by then


# ------------------------------------------------------------ process tools
def free_ports(count):
    """Ports the OS hands out for port 0 (closed again for the workers)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM)
               for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def worker_env(tf_config=None):
    """One thread per process, CPU only, quiet; TF_CONFIG if given."""
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.pop("KFT_MEMBER_INDEX", None)
    env.update(
        TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow",
        CUDA_VISIBLE_DEVICES="", TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), env.get("PYTHONPATH")) if p
        ),
    )
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


class Processes:
    """Subprocesses started in their own process groups, killed on timeout."""

    def __init__(self, log_dir):
        self.log_dir = pathlib.Path(log_dir)
        self.procs = []

    def start(self, args, env, name):
        log = open(self.log_dir / f"{name}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, *map(str, args)], env=env, cwd=str(ROOT),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        proc.log_path = self.log_dir / f"{name}.log"
        self.procs.append(proc)
        return proc

    def start_cluster(self, args, num_workers, name):
        ports = free_ports(num_workers)
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        return [
            self.start(args, worker_env(
                {"cluster": cluster, "task": {"type": "worker", "index": i}}
            ), f"{name}_{i}")
            for i in range(num_workers)
        ]

    def kill(self, proc):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def wait(self, procs, deadline):
        """Return codes; kills every process still running at `deadline`."""
        codes = []
        for proc in procs:
            try:
                codes.append(
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                )
            except subprocess.TimeoutExpired:
                for p in procs:
                    self.kill(p)
                pytest.fail(
                    f"process timed out and was killed:\n{tail(proc)}"
                )
        return codes

    def kill_all(self):
        for proc in self.procs:
            self.kill(proc)


def tail(proc, chars=4000):
    return proc.log_path.read_text(errors="replace")[-chars:]


def worker_config(out_dir, **extra):
    config = dict(
        out_dir=str(out_dir), grows=list(GROWS), epochs=EPOCHS,
        examples=EXAMPLES, global_batch=GLOBAL_BATCH,
        update_interval=INTERVAL, sizes=[20, 64, 32, 3], seed=0,
    )
    config.update(extra)
    path = pathlib.Path(out_dir) / "config.json"
    path.write_text(json.dumps(config))
    return path


def load_run(out_dir, grow, rank):
    with np.load(pathlib.Path(out_dir) / f"{grow}_{rank}.npz") as data:
        arrays = {k: data[k] for k in data.files}
    meta_path = pathlib.Path(out_dir) / f"{grow}_{rank}.json"
    meta = json.loads(meta_path.read_text())
    return arrays, meta


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    procs = Processes(tmp_path_factory.mktemp("logs"))
    yield procs
    procs.kill_all()


@pytest.fixture(scope="module")
def dst_members(processes, tmp_path_factory):
    """2 processes, each training its DST member (started early: they run
    while cluster 1 trains)."""
    member_dir = tmp_path_factory.mktemp("dst") / "members"
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}  # never dialed
    procs = [
        processes.start(
            [DST_MEMBER, member_dir, 2],
            worker_env({"cluster": cluster,
                        "task": {"type": "worker", "index": i}}),
            f"dst_{i}",
        )
        for i in range(2)
    ]
    return procs, member_dir


@pytest.fixture(scope="module")
def runs(processes, tmp_path_factory, dst_members):
    """Cluster 1 (2 workers) and the 1-worker reference, run side by side."""
    del dst_members  # only started first
    two = tmp_path_factory.mktemp("two_workers")
    one = tmp_path_factory.mktemp("one_worker")
    cluster = processes.start_cluster(
        [WORKER, worker_config(
            two, checkpoint=str(two / "ckpt_{grow}_{rank}.keras"),
            probe_guards=True, edst_dir=str(two / "edst_members"),
        )], 2, "cluster1",
    )
    reference = processes.start(
        [WORKER, worker_config(one, edst_dir=str(one / "edst_members"),
                               probe_guards=True)],
        worker_env(), "reference",
    )
    deadline = time.monotonic() + CLUSTER_TIMEOUT_S
    procs = cluster + [reference]
    codes = processes.wait(procs, deadline)
    for proc, code in zip(procs, codes):
        assert code == 0, f"worker failed ({code}):\n{tail(proc)}"
    return {"two": two, "one": one}


# ----------------------------------------------------- cluster 1: fit works
@pytest.mark.parametrize("grow", RUNS)
def test_workers_end_identical(runs, grow):
    a, meta_a = load_run(runs["two"], grow, 0)
    b, meta_b = load_run(runs["two"], grow, 1)
    assert meta_a["num_workers"] == meta_b["num_workers"] == 2
    assert meta_a["replicas"] == 2
    keys = [k for k in a if k.startswith(("mask/", "weight/"))]
    assert len([k for k in keys if k.startswith("mask/")]) == 2
    for key in keys:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert meta_a["history"] == meta_b["history"]
    assert meta_a["evaluate"] == meta_b["evaluate"]
    np.testing.assert_array_equal(a["predict"], b["predict"])


@pytest.mark.parametrize("grow", RUNS)
def test_two_workers_match_one_worker(runs, grow):
    two, meta_two = load_run(runs["two"], grow, 0)
    one, meta_one = load_run(runs["one"], grow, 0)
    assert meta_one["num_workers"] == 1
    for meta in (meta_one, meta_two):
        epochs = len(meta["history"]["loss"])
        assert epochs == (3 if grow == "edst" else EPOCHS)
        assert meta["steps_per_epoch"] == STEPS_PER_EPOCH
        assert meta["iterations"] == epochs * STEPS_PER_EPOCH
        assert meta["problems"] == []
    assert meta_two["mask_updates"] == meta_one["mask_updates"] > 0
    for key in (k for k in one if k.startswith("mask/")):
        active = one[key]
        agree = np.count_nonzero(active & two[key]) / np.count_nonzero(active)
        assert agree >= 0.99, f"{key}: {agree:.4f} of active weights agree"
    for key in (k for k in one if k.startswith("weight/")):
        np.testing.assert_allclose(two[key], one[key], atol=1e-5, rtol=0,
                                   err_msg=key)
    # Epoch-end and evaluate metrics are global values, not one worker's.
    np.testing.assert_allclose(meta_two["history"]["loss"],
                               meta_one["history"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(meta_two["evaluate"]["loss"],
                               meta_one["evaluate"]["loss"], rtol=1e-5)
    # predict returns every row, in order.
    assert two["predict"].shape == (200, 3)
    np.testing.assert_allclose(two["predict"], one["predict"], atol=1e-5)


def test_masks_were_rewired(runs):
    """Random and gradient growth end with different masks (both trained)."""
    random_run, _ = load_run(runs["two"], "random", 0)
    gradient_run, _ = load_run(runs["two"], "gradient", 0)
    key = next(k for k in random_run if k.startswith("mask/"))
    assert not np.array_equal(random_run[key], gradient_run[key])


def test_edst_members_from_two_workers_match_one_worker(runs):
    """Both workers save the same members atomically into one folder."""
    from keras_freetickets import members as members_lib

    shared, alone = runs["two"] / "edst_members", runs["one"] / "edst_members"
    assert sorted(os.listdir(shared)) == ["member_0.kftm", "member_1.kftm"]
    weights = {}
    for i in range(2):
        two = members_lib.read_member_weights(
            members_lib.member_path(shared, i)
        )
        one = members_lib.read_member_weights(
            members_lib.member_path(alone, i)
        )
        assert list(two) == list(one)
        for key in one:
            np.testing.assert_allclose(two[key], one[key], atol=1e-5,
                                       err_msg=f"member {i} {key}")
            if one[key].ndim == 2:  # kernels: the same active weights
                active = one[key] != 0
                agree = np.count_nonzero(active & (two[key] != 0))
                assert agree >= 0.99 * np.count_nonzero(active)
        weights[i] = two
    # The global exploration between the members rewired them.
    kernel = next(k for k in weights[0] if weights[0][k].ndim == 2)
    assert not np.array_equal(weights[0][kernel] != 0,
                              weights[1][kernel] != 0)


def test_chief_only_checkpoint(runs):
    import keras

    import importlib

    importlib.import_module("keras_freetickets.sparse_optimizer")  # registers

    two = runs["two"]
    assert not (two / "ckpt_gradient_1.keras").exists()
    model = keras.models.load_model(two / "ckpt_gradient_0.keras")
    final, _ = load_run(two, "gradient", 0)
    final_weights = [v for k, v in final.items() if k.startswith("weight/")]
    assert len(model.weights) == len(final_weights) == 6
    for weight, value in zip(model.weights, final_weights):
        np.testing.assert_array_equal(weight.numpy(), value)


def test_refused_settings_raise_clear_errors(runs):
    for rank in (0, 1):
        errors = json.loads(
            (runs["two"] / f"guards_{rank}.json").read_text()
        )
        assert errors["steps_per_execution"] is not None
        assert "steps_per_execution=2" in errors["steps_per_execution"]
        assert errors["jit_compile"] is not None
        assert "jit_compile=True" in errors["jit_compile"]
    # On one worker the same settings train.
    alone = json.loads((runs["one"] / "guards_0.json").read_text())
    assert alone == {"steps_per_execution": None, "jit_compile": None}


def test_mixin_model_trains_on_two_workers(runs):
    with np.load(runs["two"] / "mixin_0.npz") as a, \
            np.load(runs["two"] / "mixin_1.npz") as b, \
            np.load(runs["one"] / "mixin_0.npz") as one:
        assert sorted(a.files) == sorted(one.files)
        for key in one.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
            np.testing.assert_allclose(a[key], one[key], atol=1e-5,
                                       rtol=1e-5, err_msg=key)
        assert a["loss"][1] < a["loss"][0]


# ------------------------------------- cluster 2: dead worker, then restart
# Slow (~40 s: two more 2-worker clusters); `scripts/test.sh -m slow` runs it.
@pytest.mark.slow
def test_dead_worker_then_restart_resumes_exactly(runs, processes,
                                                   tmp_path_factory):
    out = tmp_path_factory.mktemp("restart")
    backup = out / "backup"
    config = worker_config(
        out, grows=["gradient"], backup_base=str(backup),
        pause_at_step=PAUSE_STEP, pause_rank=1,
    )
    deadline = time.monotonic() + CLUSTER_TIMEOUT_S
    survivor, victim = processes.start_cluster([WORKER, config], 2, "dead")
    while not (out / "paused_1").exists():
        assert victim.poll() is None, f"worker 1 exited:\n{tail(victim)}"
        assert survivor.poll() is None, f"worker 0 exited:\n{tail(survivor)}"
        if time.monotonic() > deadline:
            processes.kill(survivor)
            processes.kill(victim)
            pytest.fail("worker 1 never reached the pause step")
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    victim.wait()
    [code] = processes.wait(
        [survivor], min(deadline, killed_at + SURVIVOR_BOUND_S)
    )
    noticed_s = time.monotonic() - killed_at
    print(f"survivor exited {noticed_s:.1f} s after the SIGKILL")
    assert code != 0, "the survivor finished training without worker 1"
    assert noticed_s < SURVIVOR_BOUND_S
    # It failed because its peer was gone, not for another reason.
    log = tail(survivor, 20000)
    assert any(word in log for word in (
        "UnavailableError", "unhealthy", "heartbeat", "AbortedError",
        "CancelledError", "DeadlineExceededError",
    )), log
    # One backup per worker, both after the 2 epochs completed (the
    # `checkpoint` file of kft.BackupAndRestore names the newest one).
    for rank in (0, 1):
        meta = json.loads((backup / f"worker_{rank}" / "checkpoint").read_text())
        assert meta["epoch"] == PAUSE_STEP // STEPS_PER_EPOCH
    assert not (out / "gradient_0.npz").exists()

    # Restart the whole cluster: it resumes from the backups.
    config = worker_config(out, grows=["gradient"], backup_base=str(backup))
    restarted = processes.start_cluster([WORKER, config], 2, "restart")
    codes = processes.wait(
        restarted, time.monotonic() + CLUSTER_TIMEOUT_S
    )
    for proc, code in zip(restarted, codes):
        assert code == 0, f"restarted worker failed ({code}):\n{tail(proc)}"
    uninterrupted, meta_u = load_run(runs["two"], "gradient", 0)
    for rank in (0, 1):
        resumed, meta_r = load_run(out, "gradient", rank)
        assert meta_r["iterations"] == STEPS
        assert meta_r["mask_updates"] == meta_u["mask_updates"]
        # Only the epochs after the backup ran again, with the same losses.
        resumed_epochs = len(meta_r["history"]["loss"])
        assert 0 < resumed_epochs < EPOCHS
        assert meta_r["history"]["loss"] == (
            meta_u["history"]["loss"][-resumed_epochs:]
        )
        for key in uninterrupted:
            if key.startswith(("mask/", "weight/")):
                np.testing.assert_array_equal(
                    resumed[key], uninterrupted[key], err_msg=key
                )


# ------------------------------------------- DST members across processes
def test_dst_members_one_per_worker(processes, dst_members):
    import keras_freetickets as kft
    from keras_freetickets import distributed
    from keras_freetickets import members as members_lib

    procs, member_dir = dst_members
    try:
        ensemble = distributed.ensemble_from_directory(
            member_dir, 2, timeout_s=CLUSTER_TIMEOUT_S, poll_s=0.5
        )
    finally:
        codes = processes.wait(procs, time.monotonic() + CLUSTER_TIMEOUT_S)
    for proc, code in zip(procs, codes):
        assert code == 0, f"member worker failed ({code}):\n{tail(proc)}"
    assert isinstance(ensemble, kft.FreeTicketsEnsemble)
    assert ensemble.num_members == 2
    assert sorted(os.listdir(member_dir)) == ["member_0.kftm", "member_1.kftm"]
    seeds = []
    for i in range(2):
        meta = members_lib.read_member_metadata(
            members_lib.member_path(member_dir, i)
        )
        assert meta["member_index"] == i
        seeds.append(meta["seed"])
    assert seeds == [0, 1]
    x = np.random.default_rng(1).normal(size=(8, 20)).astype("float32")
    assert ensemble.predict(x, verbose=0).shape == (8, 3)


# ------------------------------------------------------ in-process helpers
CLUSTER3 = {"chief": ["h:0"], "worker": ["h:1", "h:2"]}


@pytest.mark.parametrize(
    "task, rank, chief",
    [
        ({"type": "chief", "index": 0}, 0, True),
        ({"type": "worker", "index": 0}, 1, False),
        ({"type": "worker", "index": 1}, 2, False),
    ],
)
def test_task_info_with_chief(task, rank, chief):
    from keras_freetickets import distributed

    config = {"cluster": CLUSTER3, "task": task}
    info = distributed.task_info(json.dumps(config))
    assert info["num_workers"] == 3
    assert info["worker_rank"] == rank
    assert distributed.member_index_from_cluster(config) == rank
    assert distributed.is_chief(config) is chief
    assert distributed.worker_backup_dir("b", config) == os.path.join(
        "b", f"{task['type']}_{task['index']}"
    )


def test_task_info_without_tf_config(monkeypatch):
    from keras_freetickets import distributed

    monkeypatch.delenv("TF_CONFIG", raising=False)
    info = distributed.task_info()
    assert (info["num_workers"], info["worker_rank"], info["is_chief"]) == (
        1, 0, True
    )
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["a:1", "b:2"]},
         "task": {"type": "worker", "index": 1}}
    ))
    assert distributed.member_index_from_cluster() == 1
    assert not distributed.is_chief()


@pytest.mark.parametrize(
    "config, match",
    [
        ("{not json", "must be JSON"),
        ({"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}},
         "task.type"),
        ({"cluster": {"worker": ["a:1"]},
          "task": {"type": "worker", "index": 3}}, "task.index"),
        (5, "tf_config"),
    ],
)
def test_task_info_rejects_bad_config(config, match):
    from keras_freetickets import distributed

    with pytest.raises(ValueError, match=match):
        distributed.task_info(config)


def test_member_index_refuses_evaluator():
    from keras_freetickets import distributed

    config = {"cluster": {"worker": ["a:1"], "evaluator": ["b:1"]},
              "task": {"type": "evaluator", "index": 0}}
    with pytest.raises(ValueError, match="evaluator"):
        distributed.member_index_from_cluster(config)


@pytest.mark.parametrize("chief", [True, False])
def test_chief_only_forwards_on_chief(chief):
    import keras

    from keras_freetickets import distributed

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.calls = []

        def on_epoch_end(self, epoch, logs=None):
            self.calls.append(epoch)

    inner = Record()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.zeros((4, 2)), np.zeros((4, 1)), epochs=2, verbose=0,
              callbacks=[distributed.ChiefOnly(inner, chief=chief)])
    assert inner.calls == ([0, 1] if chief else [])
    assert inner.model is model


def test_chief_only_validates():
    from keras_freetickets import distributed

    with pytest.raises(ValueError, match="callback"):
        distributed.ChiefOnly(object())


def test_wait_for_members_lists_missing(tmp_path):
    from keras_freetickets import distributed

    (tmp_path / "member_1.kftm").write_bytes(b"")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"members \[0, 2\]"):
        distributed.wait_for_members(tmp_path, 3, timeout_s=0.3, poll_s=0.1)
    assert 0.25 < time.monotonic() - start < 5
    with pytest.raises(TimeoutError, match=r"members \[0, 1\]"):
        distributed.wait_for_members(tmp_path / "absent", 2, timeout_s=0)
    with pytest.raises(ValueError, match="timeout_s"):
        distributed.wait_for_members(tmp_path, 3, timeout_s=-1)
    with pytest.raises(ValueError, match="poll_s"):
        distributed.wait_for_members(tmp_path, 3, poll_s=0)


def test_wait_for_members_returns_paths(tmp_path):
    from keras_freetickets import distributed

    for i in range(2):
        (tmp_path / f"member_{i}.kftm").write_bytes(b"")
    paths = distributed.wait_for_members(tmp_path, 2, timeout_s=0)
    assert [os.path.basename(p) for p in paths] == [
        "member_0.kftm", "member_1.kftm"
    ]


def test_prepare_model_checks_scope_and_is_noop_on_one_worker():
    import keras
    import tensorflow as tf

    from keras_freetickets import distributed

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert distributed.prepare_model(model) is model
    assert not hasattr(model, "_kft_multi_worker_ready")
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    with pytest.raises(ValueError, match="strategy.scope"):
        distributed.prepare_model(model, strategy)
    with strategy.scope():
        inside = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert distributed.prepare_model(inside, strategy) is inside
    with pytest.raises(ValueError, match="keras.Model"):
        distributed.prepare_model("model")


def test_mixin_is_noop_without_multi_worker():
    import keras

    from keras_freetickets import distributed

    class Mixed(distributed.MultiWorkerModelMixin, keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    model = Mixed()
    model.compile(optimizer="sgd", loss="mse", steps_per_execution=2)
    x = np.random.default_rng(0).normal(size=(32, 2)).astype("float32")
    history = model.fit(x, x[:, :1], epochs=2, batch_size=8, verbose=0)
    assert np.ndim(history.history["loss"][0]) == 0
    assert history.history["loss"][1] < history.history["loss"][0]


def test_make_strategy():
    import tensorflow as tf

    from keras_freetickets import distributed

    with pytest.raises(ValueError, match="Argument `name`"):
        distributed.make_strategy("horovod")
    assert not distributed.is_multi_worker(distributed.make_strategy())
    one = distributed.make_strategy("one_device")
    assert isinstance(one, tf.distribute.OneDeviceStrategy)
