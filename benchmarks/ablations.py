"""The FreeTickets paper's ablations and robustness study on FMNIST-MLP v1.

One command per experiment (`--experiment`), each writing
`<out>/ablation_<experiment>_<budget>.json`, `.md` and `.png`:

- `q`: EDST's forced diversity. EDST M = 3 in one run with global exploration
  q = 0.1, 0.5, 0.8; the members' pairwise disagreement, KL and mask overlap,
  and the ensemble's accuracy, NLL and ECE.
- `p_interval`: DST Ensemble's sensitivity to the exploration rate p (0.3,
  0.5, 0.7 at an update interval of 100 steps) and to the update interval
  (50, 100, 200 steps at p = 0.5), one factor at a time: member and ensemble
  accuracy, diversity, and the fraction of weights ever activated (the
  members' `ever_active` metadata from `kft.train_dst_ensemble`).
- `diversity`: diversity from topology vs from initialization: the dense
  ensemble (3 seeds) against DST Ensemble (3 seeds) and against DST Ensemble
  whose members share the initial weights (only masks and data order
  differ); and EDST against a dense ensemble given the same training FLOPs
  (`kft.flops`, RigL's accounting; each dense member trains
  FLOPs(EDST) / (3 x 3 f_D x batch) steps with the same lr steps).
- `robustness`: accuracy, NLL and ECE on FMNIST-C v1
  (`benchmarks/corruptions.py`) for single dense, dense ensemble, DST
  Ensemble and EDST Ensemble, and a plot of accuracy against severity.
- `all`: every experiment in one process; runs shared between experiments
  (the dense seeds, DST at p = 0.5 / 100 steps, EDST at q = 0.8) train once.

The protocol helpers (model, data, optimizer, schedules, the dense, DST and
EDST training loops, scoring and the FLOPs accounting) are imported from
`benchmarks/fmnist_table.py`, so these rows are trained exactly as the main
results table's. Budgets (`--budget`): `small` (the committed results: 10
epochs, lr x0.1 at epochs 5 and 8, EDST 4 + 3 x 2 epochs, the first 20,000
training images, full 10,000-image test set), `full` (the protocol: 30 epochs,
55,000 images, EDST 15 + 3 x 5) and `tiny` (a smoke run for the tests: 2
epochs on 1,000 images, M = 2, 500 test images, update intervals 2/4/8).
Seeds: dense and DST members 0..M-1, EDST 0, FMNIST-C 0.

Usage:

```
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/ablations.py \
    --experiment=all --budget=small --readme=benchmarks/README.md
TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python benchmarks/ablations.py \
    --experiment=q --budget=full
```

Of `fmnist_table.py`'s flags (defined when it is imported) only `--out`,
`--readme`, `--work_dir` and `--l2` apply here.
"""

import copy
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
import warnings

import benchkit  # first: sets what TensorFlow reads at import, and sys.path

from absl import app
from absl import flags

import corruptions
import fmnist_table as ft

EXPERIMENTS = ("robustness", "diversity", "q", "p_interval")
BUDGETS = {
    "tiny": dict(
        epochs=2, lr_boundaries=[1], train_examples=1000, eval_examples=500,
        edst_exploration_epochs=1, edst_refinement_epochs=1, num_members=2,
        intervals=(2, 4, 8), default_interval=4,
        text="tiny smoke budget (2 epochs, lr x0.1 at epoch 1, EDST 1 + 2 x 1"
             " epochs, M = 2, first 1,000 training images, first 500 test "
             "images, update intervals 2/4/8 steps): NOT meaningful numbers",
    ),
    "small": dict(
        epochs=10, lr_boundaries=[5, 8], train_examples=20000,
        eval_examples=10000, edst_exploration_epochs=4,
        edst_refinement_epochs=2, num_members=3, intervals=(50, 100, 200),
        default_interval=100,
        text="small CPU budget: FMNIST-MLP v1's model, optimizer (SGD 0.05, "
             "momentum 0.9, L2 5e-4, batch 128) and sparse settings (S = 0.8,"
             " ERK, RigL, no mask updates in the last 25%), but 10 epochs "
             "with lr x0.1 at epochs 5 and 8, EDST 4 + 3 x 2 epochs, and the "
             "first 20,000 of the 55,000 training images (157 steps/epoch); "
             "test = all 10,000 t10k images",
    ),
    "full": dict(
        epochs=30, lr_boundaries=[15, 23], train_examples=55000,
        eval_examples=10000, edst_exploration_epochs=15,
        edst_refinement_epochs=5, num_members=3, intervals=(50, 100, 200),
        default_interval=100,
        text="the full FMNIST-MLP v1 budget (30 epochs, lr x0.1 at 15 and 23,"
             " EDST 15 + 3 x 5 epochs, 55,000 training images)",
    ),
}
Q_VALUES = (0.1, 0.5, 0.8)
P_VALUES = (0.3, 0.5, 0.7)

FLAGS = flags.FLAGS
flags.DEFINE_enum("experiment", "all", list(EXPERIMENTS) + ["all"],
                  "Which experiment to run (all: every one, sharing runs).")
flags.DEFINE_enum("budget", "small", list(BUDGETS),
                  "tiny (smoke test), small (the committed CPU results) or "
                  "full (the FMNIST-MLP v1 budget).")


# ------------------------------------------------------------------ setup
def make_config(budget, l2=ft.L2):
    """The run settings of a budget, in `fmnist_table`'s config format."""
    if budget not in BUDGETS:
        raise ValueError(f"Argument `budget` must be one of {list(BUDGETS)}."
                         f" Received: budget={budget!r}")
    b = BUDGETS[budget]
    members = b["num_members"]
    return dict(
        protocol="mlp", protocol_name="FMNIST-MLP v1", budget_name=budget,
        budget=b["text"], epochs=b["epochs"],
        train_examples=b["train_examples"],
        eval_examples=b["eval_examples"], methods=list(ft.METHODS),
        lr_boundaries=list(b["lr_boundaries"]),
        learning_rate=ft.LEARNING_RATE, momentum=ft.MOMENTUM, l2=l2,
        batch_size=ft.BATCH_SIZE, sparsity=ft.SPARSITY, distribution="erk",
        grow="gradient", drop_fraction=ft.DROP_FRACTION,
        update_interval=b["default_interval"],
        update_intervals=list(b["intervals"]),
        update_end_fraction=ft.UPDATE_END_FRACTION, num_members=members,
        seeds=list(range(members)),
        edst_exploration_epochs=b["edst_exploration_epochs"],
        edst_refinement_epochs=b["edst_refinement_epochs"],
        edst_global_drop_fraction=ft.GLOBAL_DROP_FRACTION,
        ece_bins=ft.ECE_BINS, corruption_seed=corruptions.SEED,
    )


class ProtocolData(ft.ProtocolData):
    """fmnist_table's arrays, the test and OOD sets cut to `eval_examples`."""

    def __init__(self, config):
        super().__init__("mlp", config["train_examples"])
        n = config["eval_examples"]
        self.x_test, self.y_test = self.x_test[:n], self.y_test[:n]
        self.ood = {k: v[:n] for k, v in self.ood.items()}
        self.corrupted = None

    def with_corruptions(self):
        """A view whose `ood` also holds the 30 FMNIST-C v1 sets (made once;
        the training helpers predict every set in `ood`)."""
        if self.corrupted is None:
            start = time.perf_counter()
            self.corrupted = {
                corruptions.set_name(c, s): x
                for c, s, x in corruptions.fmnist_c(self.x_test)
            }
            print(f"[fmnist-c] 30 sets of {len(self.x_test)} images in "
                  f"{time.perf_counter() - start:.1f}s", flush=True)
        view = copy.copy(self)
        view.ood = dict(self.ood, **self.corrupted)
        return view

    def plain(self):
        view = copy.copy(self)
        view.ood = {k: self.ood[k] for k in ("digits", "noise")}
        return view


class Runner:
    """Trains each distinct run once and keeps its member records."""

    def __init__(self, config, work_dir, corrupted=False):
        import keras

        import keras_freetickets as kft

        self.config = config
        self.work_dir = pathlib.Path(work_dir)
        self.data = ProtocolData(config)
        self.corrupted = corrupted
        self.cache = {}
        self.seconds = {}
        keras.backend.clear_session()
        self.f_dense = float(kft.flops.dense_forward_flops(
            ft.build_model("mlp", 0, config["l2"])))

    def _view(self, default):
        if default and self.corrupted:
            return self.data.with_corruptions()
        return self.data.plain()

    def _timed(self, key, fn):
        if key not in self.cache:
            start = time.perf_counter()
            self.cache[key] = fn()
            self.seconds[key] = time.perf_counter() - start
            print(f"[run] {key} in {self.seconds[key]:.0f}s", flush=True)
        return self.cache[key]

    def dense(self):
        """Dense runs with seeds 0..M-1 (seed 0 is the single dense run)."""
        return self._timed("dense", lambda: [
            ft.train_dense(self.config, self._view(True), s)
            for s in self.config["seeds"]
        ])

    def dst(self, drop_fraction=None, interval=None, same_init=False):
        """A DST Ensemble; the default (p, interval) feeds robustness."""
        config = dict(self.config)
        config["drop_fraction"] = drop_fraction or config["drop_fraction"]
        config["update_interval"] = interval or config["update_interval"]
        default = (config["drop_fraction"] == self.config["drop_fraction"]
                   and config["update_interval"]
                   == self.config["update_interval"] and not same_init)
        key = (f"dst_p{config['drop_fraction']:g}_i{config['update_interval']}"
               + ("_same_init" if same_init else ""))

        def train():
            member_dir = self.work_dir / key
            shutil.rmtree(member_dir, ignore_errors=True)
            view = self._view(default)
            if same_init:
                run = _train_dst_same_init(config, view, str(member_dir))
            else:
                run = ft.train_dst(config, view, str(member_dir))
            _attach_metadata(run, member_dir)
            run["config"] = config
            return run

        return self._timed(key, train)

    def edst(self, q=None):
        config = dict(self.config)
        config["edst_global_drop_fraction"] = (
            q or config["edst_global_drop_fraction"]
        )
        default = (config["edst_global_drop_fraction"]
                   == self.config["edst_global_drop_fraction"])
        key = f"edst_q{config['edst_global_drop_fraction']:g}"

        def train():
            member_dir = self.work_dir / key
            shutil.rmtree(member_dir, ignore_errors=True)
            run = ft.train_edst(config, self._view(default), str(member_dir))
            _attach_metadata(run, member_dir)
            run["config"] = config
            return run

        return self._timed(key, train)

    def dense_at_flops(self, relative_flops):
        """A dense ensemble of M seeds whose total training FLOPs equal
        `relative_flops` dense runs; each member keeps the lr steps."""
        config = self.config
        total_steps = config["epochs"] * self.data.steps_per_epoch
        per_member = relative_flops * total_steps / config["num_members"]
        steps_per_epoch = max(1, int(round(per_member / config["epochs"])))
        key = f"dense_flops_{steps_per_epoch}"
        return self._timed(key, lambda: [
            _train_dense_steps(config, self.data.plain(), s, steps_per_epoch)
            for s in config["seeds"]
        ])

    def rows(self, runs):
        """fmnist_table's scored rows of `runs` (dense/dst/edst entries)."""
        runs = dict(runs, f_dense=self.f_dense)
        return ft.score_rows(self.config, self.data.plain(), runs)


def _attach_metadata(run, member_dir):
    """Adds each member's saved metadata (ever_active, density) to its record."""
    import keras_freetickets as kft

    for record in run["members"]:
        metadata = kft.members.read_member_metadata(
            os.path.join(member_dir, record["member_file"]))
        record["ever_active"] = metadata.get("ever_active")
        record["mask_density"] = metadata.get("density")


def _train_dst_same_init(config, data, member_dir):
    """DST Ensemble whose members share seed 0's initial weights: masks
    (optimizer seed) and data order still differ per member."""
    import keras

    def build(seed):
        model = ft.build_model("mlp", 0, config["l2"])
        keras.utils.set_random_seed(seed)  # the member's own data order
        return model

    return ft.train_dst(config, data, member_dir, build=build,
                        label="DST same-init")


def _train_dense_steps(config, data, seed, steps_per_epoch):
    """A dense run of `epochs` x `steps_per_epoch` steps (same lr steps)."""
    import keras

    keras.backend.clear_session()
    model = ft.build_model("mlp", seed, config["l2"])
    model.compile(
        optimizer=keras.optimizers.SGD(ft.LEARNING_RATE, momentum=ft.MOMENTUM),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    timer = ft.epoch_timer(f"dense@flops seed {seed}", config["epochs"])
    start = time.perf_counter()
    model.fit(data.train_dataset(seed).repeat(), epochs=config["epochs"],
              steps_per_epoch=steps_per_epoch, verbose=0,
              callbacks=[ft.lr_scheduler(config), timer])
    return dict(
        seed=seed, epoch_seconds=timer.seconds,
        wall_seconds=time.perf_counter() - start,
        steps=int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        update_steps=0, density=1.0,
        probs=ft.predict_member(model, data),
    )


# ------------------------------------------------------------ experiments

def experiment_q(runner):
    rows = {}
    for q in Q_VALUES:
        run = runner.edst(q)
        row = runner.rows({"edst": run})["edst_ensemble"]
        row["q"] = q
        rows[f"q={q:g}"] = row
    return dict(rows=rows, verdict=_verdict_q(rows))


def experiment_p_interval(runner):
    config = runner.config
    settings = [(p, config["update_interval"]) for p in P_VALUES]
    settings += [(config["drop_fraction"], i)
                 for i in config["update_intervals"]
                 if i != config["update_interval"]]
    rows = {}
    for p, interval in settings:
        run = runner.dst(p, interval)
        row = runner.rows({"dst": run})["dst_ensemble"]
        row.update(
            p=p, update_interval=interval,
            ever_active=float(sum(m["ever_active"] for m in run["members"])
                              / len(run["members"])),
            mask_updates=run["members"][0].get("update_steps"),
        )
        rows[f"p={p:g}, interval={interval}"] = row
    return dict(rows=rows, verdict=_verdict_p(rows, config))


def experiment_diversity(runner):
    dense = runner.dense()
    dst = runner.dst()
    same = runner.dst(same_init=True)
    edst = runner.edst()
    rows = {}
    base = runner.rows({"dense": dense, "dst": dst, "edst": edst})
    rows["dense_ensemble"] = base["dense_ensemble"]
    rows["dense"] = base["dense"]
    rows["dst_ensemble"] = base["dst_ensemble"]
    rows["dst_same_init"] = runner.rows({"dst": same})["dst_ensemble"]
    rows["edst_ensemble"] = base["edst_ensemble"]
    matched = runner.dense_at_flops(rows["edst_ensemble"]["train_flops"])
    row = runner.rows({"dense": matched})["dense_ensemble"]
    row["steps_per_member"] = matched[0]["steps"]
    rows["dense_at_edst_flops"] = row
    return dict(rows=rows, verdict=_verdict_diversity(rows))


def experiment_robustness(runner):
    import numpy as np

    from keras_freetickets import metrics

    dense = runner.dense()
    methods = {
        "dense": dense[:1], "dense_ensemble": dense,
        "dst_ensemble": runner.dst()["members"],
        "edst_ensemble": runner.edst()["members"],
    }
    labels = runner.data.y_test
    bins = runner.config["ece_bins"]
    results = {}
    for method, records in methods.items():
        def scores(name):
            probs = np.mean([r["probs"][name] for r in records], axis=0)
            return dict(
                accuracy=metrics.accuracy(labels, probs),
                nll=metrics.negative_log_likelihood(labels, probs),
                ece=metrics.expected_calibration_error(labels, probs,
                                                       num_bins=bins),
            )

        per_set = {"clean": scores("test")}
        for c in corruptions.CORRUPTIONS:
            for s in corruptions.SEVERITIES:
                name = corruptions.set_name(c, s)
                per_set[name] = scores(name)
        by_severity = {
            str(s): {m: float(np.mean([
                per_set[corruptions.set_name(c, s)][m]
                for c in corruptions.CORRUPTIONS])) for m in per_set["clean"]}
            for s in corruptions.SEVERITIES
        }
        by_corruption = {
            c: {m: float(np.mean([
                per_set[corruptions.set_name(c, s)][m]
                for s in corruptions.SEVERITIES])) for m in per_set["clean"]}
            for c in corruptions.CORRUPTIONS
        }
        mean = {m: float(np.mean([by_severity[str(s)][m]
                                  for s in corruptions.SEVERITIES]))
                for m in per_set["clean"]}
        results[method] = dict(num_members=len(records), clean=per_set["clean"],
                               by_severity=by_severity,
                               by_corruption=by_corruption, mean=mean,
                               per_set=per_set)
    return dict(rows=results, verdict=_verdict_robustness(results))


RUNNERS = {
    "q": experiment_q, "p_interval": experiment_p_interval,
    "diversity": experiment_diversity, "robustness": experiment_robustness,
}


# --------------------------------------------------------------- verdicts
def _g(value):
    return f"{value:g}"


def _monotone(values, increasing=True):
    pairs = list(zip(values, values[1:]))
    return all((b > a) if increasing else (b < a) for a, b in pairs)


def _verdict_q(rows):
    qs = sorted(rows, key=lambda k: rows[k]["q"])
    dis = [rows[k]["disagreement"] for k in qs]
    kl = [rows[k]["kl_divergence"] for k in qs]
    ov = [rows[k]["mean_mask_overlap"] for k in qs]
    acc = [rows[k]["accuracy"] for k in qs]
    more_diverse = _monotone(dis) and _monotone(kl)
    less_overlap = _monotone(ov, increasing=False)
    checks = dict(disagreement_increases_with_q=_monotone(dis),
                  kl_increases_with_q=_monotone(kl),
                  overlap_decreases_with_q=less_overlap,
                  best_accuracy_q=rows[qs[int(max(range(len(acc)),
                                                  key=acc.__getitem__))]]["q"])
    text = (
        f"As q goes {', '.join(_g(rows[k]['q']) for k in qs)}: "
        f"disagreement {', '.join(f'{v:.4f}' for v in dis)}; KL "
        f"{', '.join(f'{v:.4f}' for v in kl)}; mask overlap "
        f"{', '.join(f'{v:.3f}' for v in ov)}; ensemble accuracy "
        f"{', '.join(f'{v:.4f}' for v in acc)}. "
    )
    if more_diverse and less_overlap:
        text += ("**The seed's prediction holds at this scale**: a larger q "
                 "gives members that overlap less and disagree more, a small "
                 "q leaves them close to each other.")
    elif less_overlap:
        text += ("**The prediction holds only for the masks**: a larger q "
                 "leaves less overlap between the members' masks, but their "
                 "predictions do not become steadily more diverse "
                 "(disagreement and KL are not monotone in q).")
    else:
        text += ("**The seed's prediction does not hold at this scale**: "
                 "neither mask overlap nor prediction diversity is ordered by"
                 " q.")
    return dict(checks=checks, text=text)


def _verdict_p(rows, config):
    keys = list(rows)
    by_p = [k for k in keys if rows[k]["update_interval"]
            == config["update_interval"]]
    by_p.sort(key=lambda k: rows[k]["p"])
    by_i = [k for k in keys if rows[k]["p"] == config["drop_fraction"]]
    by_i.sort(key=lambda k: rows[k]["update_interval"])
    acc = [rows[k]["accuracy"] for k in keys]
    ever_p = [rows[k]["ever_active"] for k in by_p]
    ever_i = [rows[k]["ever_active"] for k in by_i]
    dis_p = [rows[k]["disagreement"] for k in by_p]
    dis_i = [rows[k]["disagreement"] for k in by_i]
    checks = dict(
        ensemble_accuracy_range=max(acc) - min(acc),
        ever_active_increases_with_p=_monotone(ever_p),
        ever_active_decreases_with_interval=_monotone(ever_i, False),
        disagreement_increases_with_p=_monotone(dis_p),
        disagreement_decreases_with_interval=_monotone(dis_i, False),
        best=keys[int(max(range(len(acc)), key=acc.__getitem__))],
    )
    text = (
        f"Ensemble accuracy spans {100 * checks['ensemble_accuracy_range']:.2f}"
        f" points over the {len(keys)} settings (best: {checks['best']}). "
        f"Fraction of weights ever active: p "
        f"{'/'.join(_g(rows[k]['p']) for k in by_p)}"
        f" -> {', '.join(f'{v:.3f}' for v in ever_p)}; interval "
        f"{'/'.join(str(rows[k]['update_interval']) for k in by_i)} -> "
        f"{', '.join(f'{v:.3f}' for v in ever_i)}. Disagreement: by p "
        f"{', '.join(f'{v:.4f}' for v in dis_p)}; by interval "
        f"{', '.join(f'{v:.4f}' for v in dis_i)}. "
    )
    explore = (checks["ever_active_increases_with_p"]
               and checks["ever_active_decreases_with_interval"])
    text += ("More exploration (larger p, more frequent updates) activates "
             "more of the weights, as expected. " if explore else
             "Exploration (weights ever active) is not ordered by both p and "
             "the interval. ")
    diverse = (checks["disagreement_increases_with_p"]
               and checks["disagreement_decreases_with_interval"])
    text += ("Member diversity follows exploration." if diverse else
             "**Member diversity does not follow exploration steadily at "
             "this scale** (disagreement is not monotone in p and the "
             "interval).")
    return dict(checks=checks, text=text)


def _verdict_diversity(rows):
    dense, dst = rows["dense_ensemble"], rows["dst_ensemble"]
    same, edst = rows["dst_same_init"], rows["edst_ensemble"]
    matched = rows["dense_at_edst_flops"]
    topo_more = dst["disagreement"] > dense["disagreement"]
    parts = dict(
        accuracy=edst["accuracy"] > matched["accuracy"],
        nll=edst["nll"] < matched["nll"], ece=edst["ece"] < matched["ece"],
    )
    checks = dict(dst_more_diverse_than_dense=topo_more,
                  same_init_disagreement=same["disagreement"],
                  edst_beats_dense_at_same_flops=dict(parts,
                                                      holds=all(parts.values())))
    text = (
        f"Disagreement: dense ensemble (seeds: init + data order) "
        f"{dense['disagreement']:.4f}, DST Ensemble (init + masks + order) "
        f"{dst['disagreement']:.4f}, DST with shared init (masks + order) "
        f"{same['disagreement']:.4f}. "
    )
    text += ("**Sparse topologies add diversity over random seeds alone: "
             "holds**. " if topo_more else
             "**DST Ensemble is not more diverse than the dense ensemble "
             "here: the claim that sparse topologies add diversity does not "
             "hold at this scale**. ")
    text += (
        f"At EDST's training FLOPs ({edst['train_flops']:.3f} dense runs), a "
        f"dense ensemble of {matched['num_members']} gets "
        f"{matched['steps_per_member']} steps per member: accuracy "
        f"{matched['accuracy']:.4f} vs EDST {edst['accuracy']:.4f}, NLL "
        f"{matched['nll']:.4f} vs {edst['nll']:.4f}, ECE {matched['ece']:.4f}"
        f" vs {edst['ece']:.4f}. "
    )
    text += ("**EDST beats the FLOPs-matched dense ensemble on accuracy, NLL "
             "and ECE: holds**." if all(parts.values()) else
             "**EDST does not beat the FLOPs-matched dense ensemble on every "
             "count** (fails on "
             + ", ".join(k.upper() if k != "accuracy" else k
                         for k, ok in parts.items() if not ok) + ").")
    return dict(checks=checks, text=text)


def _verdict_robustness(results):
    single = results["dense"]["mean"]
    ens = results["dense_ensemble"]["mean"]
    checks, sentences = {}, []
    for key, name in (("dst_ensemble", "DST Ensemble"),
                      ("edst_ensemble", "EDST Ensemble")):
        mean = results[key]["mean"]
        parts = dict(accuracy=mean["accuracy"] > single["accuracy"],
                     nll=mean["nll"] < single["nll"],
                     ece=mean["ece"] < single["ece"])
        vs_ens = mean["accuracy"] - ens["accuracy"]
        checks[key] = dict(parts, holds=all(parts.values()),
                           accuracy_vs_dense_ensemble=vs_ens)
        detail = (f"mean corrupted accuracy {mean['accuracy']:.4f} vs "
                  f"{single['accuracy']:.4f}, NLL {mean['nll']:.4f} vs "
                  f"{single['nll']:.4f}, ECE {mean['ece']:.4f} vs "
                  f"{single['ece']:.4f}; {100 * vs_ens:+.2f} accuracy points "
                  "vs the dense ensemble")
        if all(parts.values()):
            sentences.append(f"**{name} is more robust than the single dense "
                             f"model on accuracy, NLL and ECE: holds** "
                             f"({detail}).")
        else:
            failed = [k.upper() if k != "accuracy" else k
                      for k, ok in parts.items() if not ok]
            sentences.append(f"**{name} is not more robust than the single "
                             f"dense model on every count: does not hold** "
                             f"(fails on {', '.join(failed)}; {detail}).")
    return dict(checks=checks, text=" ".join(sentences))


# ---------------------------------------------------------------- markdown
def _f(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def _header(title, config, environment, seconds):
    return [
        f"### {title}",
        "",
        f"Budget: {config['budget']}. Seeds: dense and DST members "
        f"{config['seeds']}, EDST 0, FMNIST-C 0. Measured "
        f"{environment['date']} on {environment['machine']} (Keras "
        f"{environment['keras']}, TensorFlow {environment['tensorflow']}); "
        f"this experiment's training took {seconds:.0f} s of wall time "
        "(runs shared with other experiments counted once, where first "
        f"trained). Command: `{environment['command']}`.",
        "",
    ]


def markdown(experiment, result, config, environment):
    rows, seconds = result["rows"], result["seconds"]
    if experiment == "q":
        lines = _header("EDST: forced diversity q (global exploration "
                        "fraction)", config, environment, seconds)
        lines += ["| q | ens. acc | member acc | NLL | ECE | disagreement | "
                  "KL | mask overlap | density | train FLOPs |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows.values():
            lines.append(
                f"| {row['q']:g} | {_f(row['accuracy'])} | "
                f"{_f(row['member_accuracy'])} | {_f(row['nll'])} | "
                f"{_f(row['ece'])} | {_f(row['disagreement'])} | "
                f"{_f(row['kl_divergence'])} | "
                f"{_f(row['mean_mask_overlap'], 3)} | "
                f"{_f(row['density'], 3)} | {_f(row['train_flops'], 3)} |")
        note = ("Mask overlap = mean over member pairs of shared active "
                "weights / active weights (1 = same mask). Each row is ONE "
                "EDST run (seed 0) with M members; train FLOPs relative to "
                "one dense run of the same epochs.")
    elif experiment == "p_interval":
        lines = _header("DST Ensemble: exploration rate p and update interval",
                        config, environment, seconds)
        lines += ["| p | interval (steps) | mask updates | member acc | "
                  "ens. acc | NLL | ECE | disagreement | KL | mask overlap | "
                  "ever active |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows.values():
            lines.append(
                f"| {row['p']:g} | {row['update_interval']} | "
                f"{row['mask_updates']} | {_f(row['member_accuracy'])} | "
                f"{_f(row['accuracy'])} | {_f(row['nll'])} | "
                f"{_f(row['ece'])} | {_f(row['disagreement'])} | "
                f"{_f(row['kl_divergence'])} | "
                f"{_f(row['mean_mask_overlap'], 3)} | "
                f"{_f(row['ever_active'], 3)} |")
        note = ("One factor at a time: p varies at the default interval, "
                "the interval varies at p = 0.5 (the shared row appears "
                "once). Ever active = fraction of the kernels' entries that "
                "were active at any step (mean over members; the final "
                "density is 0.2). Mask updates = update steps per member.")
    elif experiment == "diversity":
        lines = _header("Diversity from topology vs from initialization; "
                        "EDST vs a FLOPs-matched dense ensemble", config,
                        environment, seconds)
        titles = {
            "dense": "dense single (seed 0)",
            "dense_ensemble": "dense ensemble (seeds: init + data order)",
            "dst_ensemble": "DST Ensemble (init + masks + data order)",
            "dst_same_init": "DST Ensemble, shared init (masks + data order)",
            "edst_ensemble": "EDST Ensemble (one run)",
            "dense_at_edst_flops": "dense ensemble at EDST's training FLOPs",
        }
        lines += ["| method | M | ens. acc | member acc | NLL | ECE | "
                  "disagreement | KL | mask overlap | train FLOPs |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for key, title in titles.items():
            row = rows[key]
            lines.append(
                f"| {title} | {row['num_members']} | {_f(row['accuracy'])} |"
                f" {_f(row['member_accuracy'])} | {_f(row['nll'])} | "
                f"{_f(row['ece'])} | {_f(row['disagreement'])} | "
                f"{_f(row['kl_divergence'])} | "
                f"{_f(row.get('mean_mask_overlap'), 3)} | "
                f"{_f(row['train_flops'], 3)} |")
        note = (f"The FLOPs-matched dense members train "
                f"{rows['dense_at_edst_flops']['steps_per_member']} steps "
                "each (same lr steps, compressed). Train FLOPs relative to "
                "one dense run (RigL's accounting, `kft.flops`).")
    else:
        lines = _header("Robustness on FMNIST-C v1 (6 corruptions x 5 "
                        "severities)", config, environment, seconds)
        titles = {"dense": "dense single (seed 0)",
                  "dense_ensemble": "dense ensemble",
                  "dst_ensemble": "DST Ensemble",
                  "edst_ensemble": "EDST Ensemble (one run)"}
        sev = [str(s) for s in corruptions.SEVERITIES]
        lines += ["| method | M | clean acc | " + " | ".join(
            f"sev {s} acc" for s in sev) + " | mean acc | mean NLL | "
            "mean ECE |", "|---|---|---|" + "---|" * len(sev) + "---|---|---|"]
        for key, title in titles.items():
            r = rows[key]
            lines.append(
                f"| {title} | {r['num_members']} | "
                f"{_f(r['clean']['accuracy'])} | " + " | ".join(
                    _f(r['by_severity'][s]['accuracy']) for s in sev)
                + f" | {_f(r['mean']['accuracy'])} | {_f(r['mean']['nll'])}"
                f" | {_f(r['mean']['ece'])} |")
        lines += ["", "Accuracy per corruption (mean over severities 1..5):",
                  "", "| method | " + " | ".join(corruptions.CORRUPTIONS)
                  + " |", "|---|" + "---|" * len(corruptions.CORRUPTIONS)]
        for key, title in titles.items():
            r = rows[key]
            lines.append(f"| {title} | " + " | ".join(
                _f(r["by_corruption"][c]["accuracy"])
                for c in corruptions.CORRUPTIONS) + " |")
        lines += ["", "NLL and ECE by severity:", "",
                  "| method | " + " | ".join(f"sev {s} NLL" for s in sev)
                  + " | " + " | ".join(f"sev {s} ECE" for s in sev) + " |",
                  "|---|" + "---|" * (2 * len(sev))]
        for key, title in titles.items():
            r = rows[key]
            lines.append(f"| {title} | " + " | ".join(
                _f(r["by_severity"][s]["nll"]) for s in sev) + " | "
                + " | ".join(_f(r["by_severity"][s]["ece"]) for s in sev)
                + " |")
        note = ("Ensembles average member softmax; ECE with 15 bins; "
                "severity columns average the 6 corruptions; mean = over all"
                " 30 sets. Corruptions: `benchmarks/corruptions.py`.")
    lines += ["", note, "", f"Plot: `{result['plot']}`.", "",
              "Verdict (computed from the numbers above): "
              + result["verdict"]["text"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ plots
def plot(experiment, result, config, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    budget = config["budget_name"]
    if experiment == "q":
        qs = [r["q"] for r in rows.values()]
        names = [("disagreement", "disagreement"), ("kl_divergence", "KL"),
                 ("mean_mask_overlap", "mask overlap"),
                 ("accuracy", "ensemble accuracy"), ("nll", "NLL"),
                 ("ece", "ECE")]
        fig, axes = plt.subplots(2, 3, figsize=(10, 5.5))
        for ax, (key, label) in zip(axes.flat, names):
            ax.plot(qs, [r[key] for r in rows.values()], "o-")
            ax.set_xlabel("q")
            ax.set_title(label)
        fig.suptitle(f"EDST forced diversity q ({budget} budget)")
    elif experiment == "p_interval":
        names = [("accuracy", "ensemble accuracy"),
                 ("member_accuracy", "member accuracy"),
                 ("disagreement", "disagreement"),
                 ("ever_active", "fraction ever active")]
        fig, axes = plt.subplots(2, 4, figsize=(13, 5.5))
        default_i = config["update_interval"]
        by_p = [r for r in rows.values() if r["update_interval"] == default_i]
        by_i = [r for r in rows.values()
                if r["p"] == config["drop_fraction"]]
        by_p.sort(key=lambda r: r["p"])
        by_i.sort(key=lambda r: r["update_interval"])
        for col, (key, label) in enumerate(names):
            axes[0, col].plot([r["p"] for r in by_p], [r[key] for r in by_p],
                              "o-")
            axes[0, col].set_xlabel(f"p (interval {default_i})")
            axes[0, col].set_title(label)
            axes[1, col].plot([r["update_interval"] for r in by_i],
                              [r[key] for r in by_i], "s-", color="C1")
            axes[1, col].set_xlabel(
                f"update interval, steps (p = {config['drop_fraction']:g})")
        fig.suptitle(f"DST Ensemble sensitivity ({budget} budget)")
    elif experiment == "diversity":
        keys = ["dense", "dense_ensemble", "dst_ensemble", "dst_same_init",
                "edst_ensemble", "dense_at_edst_flops"]
        labels = ["dense\nsingle", "dense\nens.", "DST\nens.",
                  "DST ens.\nshared init", "EDST\nens.", "dense ens.\n@EDST FLOPs"]
        names = [("accuracy", "ensemble accuracy"), ("nll", "NLL"),
                 ("disagreement", "disagreement"),
                 ("train_flops", "train FLOPs (x dense run)")]
        fig, axes = plt.subplots(1, 4, figsize=(16, 4))
        for ax, (key, label) in zip(axes, names):
            values = [rows[k].get(key) or 0.0 for k in keys]
            ax.bar(range(len(keys)), values,
                   color=[f"C{i}" for i in range(len(keys))])
            ax.set_xticks(range(len(keys)))
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_title(label)
            if key == "accuracy":
                low = min(values)
                ax.set_ylim(low - 0.02, max(values) + 0.01)
        fig.suptitle(f"Topology vs initialization diversity ({budget} budget)")
    else:
        names = [("accuracy", "accuracy"), ("nll", "NLL"), ("ece", "ECE")]
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        titles = {"dense": "dense single", "dense_ensemble": "dense ensemble",
                  "dst_ensemble": "DST Ensemble",
                  "edst_ensemble": "EDST Ensemble"}
        xs = [0] + list(corruptions.SEVERITIES)
        for ax, (key, label) in zip(axes, names):
            for i, (method, title) in enumerate(titles.items()):
                r = rows[method]
                ys = [r["clean"][key]] + [r["by_severity"][str(s)][key]
                                          for s in corruptions.SEVERITIES]
                ax.plot(xs, ys, "o-", label=title, color=f"C{i}")
            ax.set_xlabel("severity (0 = clean; mean over 6 corruptions)")
            ax.set_title(label)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"FMNIST-C v1 ({budget} budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------- main
def run_experiments(experiments, budget, out, readme=None, work_dir=None,
                    argv=None, l2=ft.L2):
    """Runs the experiments in order, writing each one's files when done.

    Args:
        experiments: list of names from `EXPERIMENTS`.
        budget: "tiny", "small" or "full".
        out: folder for `ablation_<experiment>_<budget>.{json,md,png}`.
        readme: markdown file whose `ablation_<experiment>_<budget>` block to
            (re)write, or None.
        work_dir: folder for member files (default: a temporary folder).
        argv: the command line recorded in the outputs.
        l2: L2 factor on every kernel.

    Returns:
        dict experiment -> its result (rows, verdict, seconds, paths).
    """
    unknown = [e for e in experiments if e not in EXPERIMENTS]
    if unknown or not experiments:
        raise ValueError(f"Argument `experiments` must name experiments in "
                         f"{list(EXPERIMENTS)}. Received: {experiments}")
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed")
    config = make_config(budget, l2)
    environment = benchkit.environment_info("ablations", argv, shared=True)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    temp = work_dir is None
    work_dir = work_dir or tempfile.mkdtemp(prefix="kft_ablations_")
    print(f"[config] {json.dumps(config)}", flush=True)
    results = {}
    try:
        runner = Runner(config, work_dir,
                        corrupted="robustness" in experiments)
        for name in sorted(experiments, key=EXPERIMENTS.index):
            before = sum(runner.seconds.values())
            start = time.perf_counter()
            result = RUNNERS[name](runner)
            result["seconds"] = sum(runner.seconds.values()) - before
            result["wall_seconds"] = time.perf_counter() - start
            stem = f"ablation_{name}_{budget}"
            result["plot"] = str(out / f"{stem}.png")
            plot(name, result, config, out / f"{stem}.png")
            block = markdown(name, result, config, environment)
            payload = dict(experiment=name, config=config,
                           environment=environment,
                           run_seconds={k: v for k, v in
                                        runner.seconds.items()},
                           **result)
            (out / f"{stem}.json").write_text(
                json.dumps(ft.to_json(payload), indent=2) + "\n")
            (out / f"{stem}.md").write_text(block)
            if readme:
                ft.write_readme(readme, stem, block)
            print(block, flush=True)
            results[name] = result
    finally:
        if temp:
            shutil.rmtree(work_dir, ignore_errors=True)
    return results


def main(argv):
    experiments = (list(EXPERIMENTS) if FLAGS.experiment == "all"
                   else [FLAGS.experiment])
    start = time.perf_counter()
    run_experiments(experiments, FLAGS.budget, FLAGS.out, FLAGS.readme,
                    FLAGS.work_dir, sys.argv, FLAGS.l2)
    print(f"[done] {experiments} in {time.perf_counter() - start:.0f}s",
          flush=True)


if __name__ == "__main__":
    app.run(main)
