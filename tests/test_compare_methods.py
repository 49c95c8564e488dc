"""examples/compare_methods.py: DDPM and DDIM on one checkpoint, timed and scored, end to end."""
import csv
import shutil

import pytest

from conftest import assert_refused, load_lesson, run_in_process
from utils.runtime import LessonError


@pytest.fixture(scope="module")
def compare():
    return load_lesson("examples/compare_methods.py")


def test_compare_methods_times_scores_and_draws_each_method(tmp_path, monkeypatch, compare, capsys,
                                                            learnable_mnist_classifier):
    monkeypatch.chdir(tmp_path)  # the metrics classifier is cached under ./outputs/metrics: put the shared one there
    (tmp_path / "outputs" / "metrics").mkdir(parents=True)
    shutil.copy(learnable_mnist_classifier["cache_dir"] / "classifier-mnist.pt", tmp_path / "outputs" / "metrics")
    data_dir = learnable_mnist_classifier["data_dir"]
    compare.lesson02.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "l02"), "--max-steps", "3",
                           "--width", "8", "--channel-mults", "1,2", "--batch-size", "16", "--num-samples", "1",
                           "--timesteps", "25"])  # DDPM's row: all 25 steps
    out = tmp_path / "compare"
    compare.main(["--checkpoint", str(tmp_path / "l02" / "checkpoint.pt"), "--data-dir", str(data_dir),
                  "--steps", "5,10", "--eta", "0,1", "--num-samples", "6", "--ddpm-samples", "4", "--batch-size", "4",
                  "--device", "cpu", "--out", str(out)])
    with open(out / "compare.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["method"], row["steps"], row["eta"], row["spacing"], row["samples"]) for row in rows] == [
        ("DDPM", "25", "", "", "4"), ("DDIM", "5", "0.0", "trailing", "6"), ("DDIM", "10", "0.0", "trailing", "6"),
        ("DDIM", "5", "1.0", "trailing", "6"), ("DDIM", "10", "1.0", "trailing", "6"),
        ("DPM-Solver++(2M)", "5", "", "logsnr", "6"), ("DPM-Solver++(2M)", "10", "", "logsnr", "6")]
    ddpm = float(rows[0]["seconds_per_image"])  # speed itself is a benchmark's business (benchmarks/), not a test's
    for row in rows:
        assert float(row["seconds_per_image"]) == pytest.approx(float(row["seconds"]) / int(row["samples"]), abs=2e-3)
        assert float(row["speedup"]) == pytest.approx(ddpm / float(row["seconds_per_image"]), abs=0.051)
    for row in rows:
        assert float(row["fd"]) >= 0 and float(row["fd_real_floor"]) >= 0 and 0 <= float(row["class_entropy_bits"])
        assert float(row["fd_above_floor"]) == pytest.approx(float(row["fd"]) - float(row["fd_real_floor"]), abs=0.01)
        assert float(row["vs_ddpm"]) == pytest.approx(float(row["fd_above_floor"]) / float(rows[0]["fd_above_floor"]),
                                                      abs=0.01)
    # The floor is measured at each row's own image count: DDPM's 4 images, the fast samplers' 6.
    assert rows[0]["fd_real_floor"] != rows[1]["fd_real_floor"] and rows[1]["fd_real_floor"] == rows[2]["fd_real_floor"]
    assert (out / "compare.png").stat().st_size > 0
    assert "| DDIM | 5 | 1.0 | trailing |" in (out / "compare.md").read_text()
    assert "v-prediction, the fast samplers' x0 not clipped" in (out / "compare.md").read_text()  # lesson 02's default
    assert f"wrote {out / 'compare.png'}" in capsys.readouterr().out
    with pytest.raises(LessonError, match="--steps 26 is more than the 25 timesteps"):
        compare.main(["--checkpoint", str(tmp_path / "l02" / "checkpoint.pt"), "--steps", "10,26",
                      "--out", str(out)])


@pytest.mark.parametrize("flags,expected", [
    (["--steps", "10,0"], "step counts must be at least 1"),
    (["--steps", "ten"], "not a comma-separated list"),
    (["--eta", "0,-1"], "every eta must lie in [0, 1]"),
    (["--eta", "0,1.5"], "every eta must lie in [0, 1]"),
    (["--num-samples", "0"], "--num-samples: must be at least 1"),
    (["--num-samples", "100", "--ddpm-samples", "200"], "--ddpm-samples (200) must be at most --num-samples (100)"),
    (["--samplers", "ddim,plms"], "samplers are ddim, dpm-solver++, euler, heun"),
])
def test_bad_flags_exit_2_with_one_line(flags, expected, tmp_path, compare, capsys):
    assert_refused(compare.parse_args, ["--out", str(tmp_path / "out"), *flags], expected, capsys)


def test_a_missing_checkpoint_is_one_line(tmp_path, compare, capsys):
    result = run_in_process(compare.main, "compare_methods.py", "--checkpoint", tmp_path / "none.pt", "--out",
                            tmp_path, capsys=capsys)
    assert result.returncode == 1 and result.stderr.strip() == f"error: no checkpoint at {tmp_path / 'none.pt'}"
