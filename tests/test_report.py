"""report.py on tiny real runs, and random_generation.py --fid's memorisation line; numbers recomputed from the
checkpoints and from brute-force nearest neighbours."""
import re

import numpy as np
import pytest
import torch

import common
import fid
import registry
import report
import train_script
from conftest import run_script
from test_memorisation import brute_force_nearest

TINY = ["--model", "MLPAE", "--image-size", "8", "--epochs", "2", "--encoding-dim", "8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-epoch MLPAE runs on shapes at 8x8 that differ in --lr, and the offline evaluator of that data."""
    root = tmp_path_factory.mktemp("report")
    models = root / "models"
    for name, lr in (("A", "0.001"), ("B", "0.002")):
        train_script.train([*TINY, "--lr", lr, "--run-name", name, "--models-dir", str(models),
                            "--log-dir", str(root / "log")])
    result = run_script("fid.py", "train-evaluator", "--image-size", "8", "--epochs", "2", "--out",
                        fid.evaluator_path("shapes", 8, models), cwd=root)
    assert result.returncode == 0, result.stderr
    return root


def table_row(markdown, run):
    return next(line for line in markdown.splitlines() if line.startswith(f"| {run} |"))


def test_report_of_two_runs(runs, tmp_path):
    models, out = runs / "models", tmp_path / "two"
    report.main(["A", "B", "--models-dir", str(models), "--out", str(out), "--samples", "32"])
    markdown = (out / "report.md").read_text()
    for run, lr in (("A", "0.001"), ("B", "0.002")):
        ckpt = torch.load(models / f"Last_{run}.pth", weights_only=True)
        history = ckpt["history"]
        best = min(history, key=lambda r: r["val_loss"])
        cells = [c.strip() for c in table_row(markdown, run).strip("|").split("|")]
        assert cells == [run, "MLPAE", f"lr {lr}", "2", f"{sum(r['cpu_seconds'] for r in history):.1f} s",
                         f"{sum(r['seconds'] for r in history):.1f} s",
                         f"val_loss {best['val_loss']:.5g} ({best['epoch']})", "not measured"]
    assert "No run has sample-quality metrics" in markdown and not list(out.glob("metric_*.png"))
    linked = re.findall(r"\]\(([^)]+)\)", markdown)
    assert sorted(linked) == sorted(p.name for p in out.glob("*.png"))   # every picture linked, every link a file
    assert {"losses.png", "samples_A.png", "samples_B.png", "closest_A.png", "closest_B.png"} <= set(linked)


def test_memorisation_rows_match_brute_force(runs, tmp_path):
    models = runs / "models"
    report.main(["A", "--models-dir", str(models), "--out", str(tmp_path), "--samples", "32"])
    markdown = (tmp_path / "report.md").read_text()
    model, ckpt = registry.load_model(models / "Last_A.pth")
    samples = fid.generate(model, 32, torch.Generator().manual_seed(0))   # what the report drew: seed 0
    data, train_idx, val_idx = registry.checkpoint_data(ckpt)
    train, validation = data.images[train_idx].flatten(1) / 255, data.images[val_idx].flatten(1) / 255
    distances, _ = brute_force_nearest(samples.flatten(1) / 255, train)
    val_distances, _ = brute_force_nearest(validation, train)
    share = np.mean(distances < np.quantile(val_distances, 0.05))
    pixels = table_row(markdown.split("## Memorisation")[1], "A")
    assert pixels.startswith(f"| A | pixels | {share:.1%} | {np.quantile(val_distances, 0.05):.4g} | "
                             f"{distances.min():.4g} |")
    assert "| A | evaluator features |" in markdown


def test_metrics_are_plotted_and_a_run_without_them_or_cpu_time_says_so(runs, tmp_path, capsys):
    ckpt = torch.load(runs / "models" / "Last_A.pth", weights_only=True)
    ckpt["train_args"]["run_name"] = "C"
    for record, fd in zip(ckpt["history"], (9.0, 4.0)):
        record.update(FD_eval=fd, KID_eval=fd / 10)
        del record["cpu_seconds"]   # as in checkpoints older than CPU-time records
    common.save_checkpoint(ckpt, tmp_path / "C.pth")
    argv = [str(tmp_path / "C.pth"), "B", "--models-dir", str(runs / "models"), "--samples", "16"]
    report.main([*argv, "--out", str(tmp_path / "out")])
    markdown = (tmp_path / "out" / "report.md").read_text()
    c_row, b_row = table_row(markdown, "C"), table_row(markdown, "B")
    assert "| n/a |" in c_row and "FD_eval 4 (2), KID_eval 0.4 (2)" in c_row and b_row.endswith("| not measured |")
    assert "B has no sample-quality metrics" in markdown and "C's checkpoint predates CPU-time records" in markdown
    assert (tmp_path / "out" / "metric_FD_eval.png").is_file() and (tmp_path / "out" / "metric_KID_eval.png").is_file()
    capsys.readouterr()
    report.main([*argv, "--table"])   # the table alone, regenerated from the saved runs
    assert capsys.readouterr().out.splitlines()[:4] == markdown.split("## Runs\n\n")[1].splitlines()[:4]


def test_random_generation_fid_prints_the_memorisation_line(runs):
    result = run_script("random_generation.py", "--model", "MLPAE", "--checkpoint", "models/Best_A.pth", "--fid",
                        "--fid-features", "evaluator", "--n", "40", "--out", "vis/a.png", cwd=runs)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("memorisation: of 40 samples,") and "in pixels and" in line and "evaluator features" in line
