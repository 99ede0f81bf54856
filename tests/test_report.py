"""report.py on tiny real runs, and random_generation.py --fid's memorisation line; numbers recomputed from the
checkpoints and from brute-force nearest neighbours."""
import re

import numpy as np
import pytest
import torch

import common
import fid
import image_data
import registry
import report
import report_tables
import swd
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
                         f"val_loss {best['val_loss']:.5g} ({best['epoch']})", "-", "not measured"]
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


def test_training_minutes_leave_out_the_measurements_cost():
    history = [dict(epoch=1, cpu_seconds=60.0), dict(epoch=2, cpu_seconds=90.0, FD_eval=5.0),
               dict(epoch=3, cpu_seconds=60.0), dict(epoch=4, cpu_seconds=90.0, FD_eval=3.0)]
    # each measurement costs 90 - 60 = 30 s (estimated): training minutes 1 + 1 = 2 at epoch 2, 4 at epoch 4
    points = report_tables.training_minutes(history, "FD_eval")
    assert [(round(m, 9), r["epoch"]) for m, r in points] == [(2.0, 2), (4.0, 4)]
    given = report_tables.training_minutes(history, "FD_eval", cost=0.0)   # the cost as given
    assert [m for m, _ in given] == [2.5, 5.0]


def test_window_table_by_hand():
    # odd epochs 60 s, even ones 90 s with a reading (a cost of 30 s): readings at 2, 4, 6 and 8 training minutes
    history = [dict(epoch=e, cpu_seconds=60.0) if e % 2 else dict(epoch=e, cpu_seconds=90.0, FD_eval=float(e),
                                                                  SWD=10.0 * e)
               for e in range(1, 9)]
    run = report_tables.Run("G", None, None, dict(history=history))
    rows = report_tables.window_table([run], [3, 5, 8, 12], 1.5)
    # within 1.5 minutes of 3: the readings at 2 and 4 (epochs 2, 4); of 5: 4 and 6; of 8: 8 alone; of 12: none
    assert rows[2] == "| G | FD_eval | 3 | 5 | 8 | - |"
    assert rows[3] == "| G | SWD | 30 | 50 | 80 | - |"


def test_window_needs_the_marks(tmp_path):
    result = run_script("report.py", "A", "--table", "--window", "2.5", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --window")


def test_minutes_table_of_a_run_without_metrics(runs, capsys):
    report.main(["A", "--models-dir", str(runs / "models"), "--table", "--at-minutes", "1", "2"])
    assert "| A | - | - | no sample-quality metric with CPU times |" in capsys.readouterr().out
    report.main(["A", "--models-dir", str(runs / "models"), "--table", "--at-epochs", "1"])
    assert "| A | - | no sample-quality metric |" in capsys.readouterr().out


def test_quality_rows_are_what_random_generation_measures(runs, monkeypatch, capsys):
    monkeypatch.chdir(runs)   # random_generation finds the evaluator in models/, as report does with --evaluator
    train_script.train(["--model", "diffusion", "--image-size", "8", "--epochs", "1", "--batch-size", "64",
                        "--timesteps", "50", "--width", "8", "--channel-mults", "1", "2", "--attention-levels", "1",
                        "--run-name", "D", "--models-dir", "models", "--log-dir", "log"])
    capsys.readouterr()
    printed = {}
    for sampler in ("ddim", "dpmpp"):
        result = run_script("random_generation.py", "--model", "diffusion", "--checkpoint", "models/Best_D.pth",
                            "--sampler", sampler, "--steps", "3", "--fid", "--fid-features", "evaluator", cwd=runs)
        assert result.returncode == 0, result.stderr
        words = result.stdout.splitlines()[1].split()
        printed[sampler] = dict(zip(words[0:6:2], map(float, words[1:6:2])))
    evaluator = str(fid.evaluator_path("shapes", 8, runs / "models"))
    report.main(["models/Best_D.pth@sampler=ddim,steps=3", "D@steps=3,sampler=dpmpp", "--quality",
                 "--fid-features", "evaluator", "--evaluator", evaluator])
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["run", "sampler options", "FD_eval", "KID_eval", "accuracy_eval", "CPU s"]
    for line, sampler in zip(lines[2:], ("ddim", "dpmpp")):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"sampler {sampler}, steps 3"
        for name, cell in zip(header[2:5], cells[2:5]):
            assert float(cell) == pytest.approx(printed[sampler][name], rel=1e-3, abs=1e-4), (sampler, name)
    assert printed["ddim"]["FD_eval"] != printed["dpmpp"]["FD_eval"]   # the options reached the sampler


@pytest.mark.parametrize("argv, message", [
    (["A@steps=x", "--quality"], "steps takes an integer, not 'x'"),
    (["A@colour=red", "--quality"], "'colour=red' in 'A@colour=red' is not KEY=VALUE"),
    (["A@steps=3", "--quality"], "--steps does not apply to the MLPAE model"),
    (["A@steps=3", "--table"], "RUN@OPTIONS (sampler options) are for --quality"),
])
def test_bad_quality_specs(runs, argv, message):
    result = run_script("report.py", *argv, cwd=runs)
    assert result.returncode == 2 and result.stderr.startswith("error:") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluators_table(runs, tmp_path, capsys):
    path = fid.evaluator_path("shapes", 8, runs / "models")
    report.main(["--evaluators", str(path)])
    row = capsys.readouterr().out.splitlines()[2]
    saved = torch.load(path, weights_only=True)
    extractor = fid.make_extractor("evaluator", evaluator_file=path)
    data = image_data.load_data("shapes", 8, 3)
    train_idx, val_idx = image_data.split_indices(len(data.images), saved["seed"])
    real, train = (extractor(data.images[i], cache=False) for i in (val_idx, train_idx[:len(val_idx)]))
    floor = fid.frechet_distance(*fid.statistics(train), *fid.statistics(real))
    assert row.startswith(f"| {path.name} | shapes | 8 | accuracy {saved['val_accuracy']:.3f} | FD_eval {floor:.3f} / ")
    floor_swd = swd.swd(data.images[val_idx], data.images[train_idx[:len(val_idx)]])["SWD"]
    assert row.endswith(f"; SWD {floor_swd:.3g} ({len(val_idx)}) |")
    not_an_evaluator = run_script("report.py", "--evaluators", "models/Last_A.pth", cwd=runs)
    assert not_an_evaluator.returncode == 2 and "is not a file of `fid.py train-evaluator`" in not_an_evaluator.stderr


def test_quality_of_an_autoencoder_stage_is_that_of_its_reconstructions(runs, monkeypatch, capsys):
    monkeypatch.chdir(runs)
    train_script.train(["--model", "LDM", "--stage", "autoencoder", "--image-size", "8", "--batch-size", "64",
                        "--ae-width", "8", "--latent-channels", "2", "--ae-downsample", "2", "--ae-epochs", "1",
                        "--run-name", "S1", "--models-dir", "models", "--log-dir", "log"])
    capsys.readouterr()
    evaluator = fid.evaluator_path("shapes", 8, runs / "models")
    report.main(["S1_autoencoder", "--quality", "--fid-features", "evaluator", "--evaluator", str(evaluator)])
    row = capsys.readouterr().out.splitlines()[2]
    model, ckpt = registry.load_model("models/Last_S1_autoencoder.pth")
    data, _, val_idx = registry.checkpoint_data(ckpt)
    real = data.images[val_idx]
    with torch.no_grad():
        reconstructions = fid.quantize(model.eval().reconstruct(real.float() / 255))
    extractor = fid.make_extractor("evaluator", evaluator_file=evaluator)
    distance = fid.frechet_distance(*fid.statistics(extractor(reconstructions, cache=False)),
                                    *fid.statistics(extractor(real, cache=False)))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:2] == ["S1_autoencoder", "reconstructions"] and float(cells[2]) == pytest.approx(distance, rel=1e-3)


def test_marks_table_by_hand():
    history = [dict(epoch=1, cpu_seconds=60.0), dict(epoch=2, cpu_seconds=90.0, FD_eval=5.0, KID_eval=0.5,
                                                     train_D_x=0.7, val_D_x=0.6),
               dict(epoch=3, cpu_seconds=60.0), dict(epoch=4, cpu_seconds=90.0, FD_eval=3.0, KID_eval=0.3, SWD=12.5)]
    run = report_tables.Run("G", None, None, dict(history=history))
    # measurements at 2 and 4 training minutes (each cost 30 s); at 6 minutes the run had ended (4 < 0.8 x 6)
    assert report_tables.marks_table([run], [2, 3, 4, 6], "min")[2] == \
        "| G | 5 / 0.5; D 0.70 vs 0.60 | 5 / 0.5; D 0.70 vs 0.60 | 3 / 0.3; SWD 12.5 | - | FD_eval 3 (4) |"
    assert report_tables.marks_table([run], [2, 3], "epoch")[2] == \
        "| G | 5 / 0.5; D 0.70 vs 0.60 | 5 / 0.5; D 0.70 vs 0.60 (at 2) | FD_eval 3 (4) |"
