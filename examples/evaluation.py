"""Scores the methods of one or more training runs; writes results.json and plots.

Used by `evaluate.py` and at the end of the training scripts. A run is an
`--output_dir` of `train_edst_ensemble.py` or `train_dst_ensemble.py`: its
`run.json` lists the methods trained (EDST, DST, dense) with their member
folders and training FLOPs. Every method is scored on the same test set and
out-of-distribution sets (BENCHMARK.md: scikit-learn digits, Gaussian noise):
its ensemble (mean of the members' softmax), each member, and the ensembles
of its first k members (for the FLOPs plot).
"""

import os

import numpy as np

import data
import training
from common import ExampleError
import keras_freetickets as kft

TABLE_COLUMNS = (
    "accuracy", "nll", "ece", "auroc_digits", "auroc_noise", "disagreement",
    "density", "train_flops", "s_per_epoch",
)
NUM_BINS = 15


def load_run(run_dir):
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        raise ExampleError(
            f"{run_dir} is not a training run: it has no run.json (give an "
            "--output_dir of train_edst_ensemble.py or train_dst_ensemble.py)"
        )
    run = training.read_json(path)
    run["dir"] = os.path.abspath(run_dir)
    return run


def _member_density(path):
    weights = kft.members.read_member_weights(path, prunable_only=True)
    active = sum(int(np.count_nonzero(w)) for w in weights.values())
    total = sum(int(w.size) for w in weights.values())
    return active / total, weights


def _score_method(run, method, x_test, y_test, ood, batch_size):
    member_dir = os.path.join(run["dir"], method["member_dir"])
    paths = kft.members.list_members(member_dir)
    ensemble = kft.FreeTicketsEnsemble.from_directory(member_dir)
    test_probs = ensemble.member_predictions(x_test, batch_size=batch_size)
    ood_probs = {
        name: ensemble.member_predictions(x, batch_size=batch_size)
        for name, x in ood.items()
    }
    report = kft.metrics.report(y_test, test_probs, ood_probs,
                                num_bins=NUM_BINS)
    prefixes = []
    for k in range(1, len(paths) + 1):
        mean = test_probs[:k].mean(axis=0)
        prefixes.append({
            "members": k,
            "accuracy": kft.metrics.accuracy(y_test, mean),
            "nll": kft.metrics.negative_log_likelihood(y_test, mean),
            "ece": kft.metrics.expected_calibration_error(y_test, mean,
                                                          NUM_BINS),
        })
    densities, layer_densities = [], []
    for path in paths:
        density, weights = _member_density(path)
        densities.append(density)
        layer_densities.append({
            name: float(np.count_nonzero(w) / w.size)
            for name, w in weights.items()
        })
    shapes = {name: tuple(w.shape) for name, w in weights.items()}
    return {
        "report": report, "prefixes": prefixes, "paths": paths,
        "densities": densities, "layer_densities": layer_densities,
        "shapes": shapes, "test_probs": test_probs, "ood_probs": ood_probs,
    }


def evaluate_runs(run_dirs, output_dir, data_dir=None, eval_examples=0,
                  batch_size=512, plots=True, log=print):
    """Scores every method of `run_dirs`, prints the table, writes results and plots.

    Args:
        run_dirs: list of training output folders (each with a run.json).
        output_dir: folder for results.json and the PNGs.
        data_dir: tfds data directory.
        eval_examples: int. First N test and OOD examples only (0: all).
        batch_size: int. Prediction batch size.
        plots: bool. Whether to write the PNGs.
        log: callable for messages and the table.

    Returns:
        The results dict written to results.json.
    """
    runs = [load_run(d) for d in run_dirs]
    datasets = {run["data"]["dataset"] for run in runs}
    shapes = {tuple(run["data"]["input_shape"]) for run in runs}
    if len(datasets) > 1 or len(shapes) > 1:
        raise ExampleError(
            f"the runs were trained on different data sets ({sorted(datasets)})"
            "; evaluate them separately"
        )
    name = runs[0]["data"]["dataset"]
    x_test, y_test, source = data.load_test_arrays(name, data_dir,
                                                   eval_examples, log=log)
    ood = data.ood_sets(x_test.shape[1:], source.fashion, eval_examples)
    log(f"[eval] {len(y_test)} test examples of {source.description}; OOD: "
        + ", ".join(f"{k} ({len(v)})" for k, v in ood.items()))

    many = len(runs) > 1
    scored = []
    for run in runs:
        prefix = f"{os.path.basename(run['dir'])}: " if many else ""
        for method in run["methods"]:
            result = _score_method(run, method, x_test, y_test, ood,
                                   batch_size)
            scored.append((run, method, prefix, result))

    # Training FLOPs relative to ONE reference for all rows: the first single
    # dense run evaluated, else what a dense run as long as the first
    # method's run would cost.
    dense = [m for _, m, _, _ in scored if m["kind"] == "dense"]
    reference = (dense[0]["train_flops"] if dense
                 else scored[0][1]["dense_run_flops"])
    reference_text = (
        "training FLOPs relative to the single dense run (RigL's accounting)"
        if dense else
        "training FLOPs relative to one dense run of the same steps (RigL's "
        "accounting)"
    )

    def relative(flops):
        return flops / reference

    rows, methods_out = {}, []
    for run, method, prefix, result in scored:
        report = result["report"]
        m = method["num_members"]
        label = method["label"]
        member_rows = []
        if method["kind"] != "dense":
            for i, member in enumerate(report["members"]):
                row_name = f"{prefix}{label} member {i}"
                member_flops = (method["members"][i]["train_flops"])
                rows[row_name] = _row(member, None, result["densities"][i],
                                      relative(member_flops),
                                      method["seconds_per_epoch"])
                member_rows.append(row_name)
            ensemble_name = f"{prefix}{label} ensemble (M={m})"
        else:
            ensemble_name = f"{prefix}{label}"
        rows[ensemble_name] = _row(
            report["ensemble"], report["disagreement"],
            float(np.mean(result["densities"])),
            relative(method["train_flops"]), method["seconds_per_epoch"],
        )
        methods_out.append({
            "run": run["dir"], "key": method["key"], "kind": method["kind"],
            "row": ensemble_name, "member_rows": member_rows,
            "num_members": m, "ensemble": report["ensemble"],
            "members": report["members"],
            "disagreement": report["disagreement"],
            "kl_divergence": report["kl_divergence"],
            "mutual_information": report["mutual_information"],
            "density": float(np.mean(result["densities"])),
            "member_densities": result["densities"],
            "train_flops": method["train_flops"],
            "train_flops_relative": relative(method["train_flops"]),
            "prefix_ensembles": [
                dict(p, train_flops=f, train_flops_relative=relative(f))
                for p, f in zip(result["prefixes"],
                                method["prefix_train_flops"])
            ],
            "seconds_per_epoch": method["seconds_per_epoch"],
            "epochs": method["epochs"],
        })

    table = kft.metrics.format_table(rows, columns=list(TABLE_COLUMNS))
    log("")
    log(table)
    log(f"({len(y_test)} test examples; ensembles average the members' "
        f"softmax; ECE with {NUM_BINS} bins; AUROC with the max-probability "
        f"score; density: nonzero fraction of the prunable kernels; "
        f"train_flops: {reference_text}; s_per_epoch: median wall seconds per epoch)")

    written = []
    if plots:
        written = write_plots(scored, y_test, output_dir, reference)
        log(f"[eval] plots: {', '.join(os.path.basename(p) for p in written)}")
    results = {
        "dataset": name,
        "source": source.description,
        "test_examples": int(len(y_test)),
        "ood_examples": {k: int(len(v)) for k, v in ood.items()},
        "runs": [run["dir"] for run in runs],
        "columns": list(TABLE_COLUMNS),
        "train_flops_reference": reference,
        "train_flops_note": reference_text,
        "table": rows,
        "table_text": table,
        "methods": methods_out,
        "plots": [os.path.basename(p) for p in written],
    }
    os.makedirs(output_dir, exist_ok=True)
    training.write_json(os.path.join(output_dir, "results.json"), results)
    log(f"[eval] results written to {os.path.join(output_dir, 'results.json')}")
    return results


def _row(metrics, disagreement, density, train_flops, seconds):
    return {
        "accuracy": metrics["accuracy"],
        "nll": metrics["nll"],
        "ece": metrics["ece"],
        "auroc_digits": metrics.get("auroc_digits"),
        "auroc_noise": metrics.get("auroc_noise"),
        "disagreement": disagreement,
        "density": density,
        "train_flops": train_flops,
        "s_per_epoch": seconds,
    }


def write_plots(scored, y_test, output_dir, flops_reference):
    """Writes the five PNGs of the issue; returns their paths."""
    from keras_freetickets.contrib import plots

    written = []
    dense = [(r, m, p, s) for r, m, p, s in scored if m["kind"] == "dense"]
    sparse = [(r, m, p, s) for r, m, p, s in scored if m["kind"] != "dense"]
    shown = dense[:1] + sparse

    def name_of(method, prefix):
        if method["kind"] == "dense":
            return f"{prefix}{method['label']}"
        return f"{prefix}{method['label']} ensemble (M={method['num_members']})"

    probs = {name_of(m, p): s["test_probs"].mean(axis=0)
             for _, m, p, s in shown}
    path = os.path.join(output_dir, "reliability.png")
    plots.reliability_diagram(y_test, probs, num_bins=NUM_BINS, path=path,
                              title="Reliability on the test set")
    written.append(path)

    ood = {name_of(m, p): {k: v.mean(axis=0) for k, v in s["ood_probs"].items()}
           for _, m, p, s in shown}
    path = os.path.join(output_dir, "ood_histograms.png")
    plots.ood_score_histograms(probs, ood, path=path,
                               title="Max-probability scores: test vs OOD")
    written.append(path)

    if sparse:
        run, method, prefix, result = sparse[0]
        flags_used = run["flags"]
        target = kft.distributions.compute_sparsities(
            result["shapes"], flags_used["sparsity"],
            flags_used["distribution"],
        )
        series = {f"{flags_used['distribution'].upper()} target":
                  {k: 1.0 - v for k, v in target.items()}}
        for _, m, p, s in sparse:
            for i, layer_density in enumerate(s["layer_densities"]):
                series[f"{p}{m['label']} member {i}"] = layer_density
        path = os.path.join(output_dir, "layer_density.png")
        plots.layer_density_bars(
            series, reference=1.0 - flags_used["sparsity"], path=path,
            layer_notes={k: "x".join(str(d) for d in shape)
                         for k, shape in result["shapes"].items()},
            title=f"Per-layer density at sparsity {flags_used['sparsity']}",
        )
        written.append(path)

        labels, member_paths = [], []
        for _, m, p, s in sparse:
            for i, member_path in enumerate(s["paths"]):
                labels.append(f"{p}{m['label']} {i}")
                member_paths.append(member_path)
        overlap = kft.members.pairwise_mask_overlap(member_paths)
        path = os.path.join(output_dir, "mask_overlap.png")
        plots.mask_overlap_heatmap(
            overlap, labels, path=path,
            reference=1.0 - flags_used["sparsity"],
            title="Shared active weights between members",
        )
        written.append(path)

    curves = {}
    for run, m, p, s in dense[:1] + sparse:
        flops = [f / flops_reference for f in m["prefix_train_flops"]]
        curves[name_of(m, p).replace(f" (M={m['num_members']})", "")] = {
            "flops": flops,
            "accuracy": [q["accuracy"] for q in s["prefixes"]],
            "nll": [q["nll"] for q in s["prefixes"]],
        }
    path = os.path.join(output_dir, "flops_tradeoff.png")
    plots.metric_vs_flops(
        curves, path=path,
        flops_label="training FLOPs (x one dense run)",
        title="Ensembles of the first k members vs training cost",
    )
    written.append(path)
    return written
