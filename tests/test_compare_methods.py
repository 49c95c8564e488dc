"""examples/compare_methods.py: DDPM and DDIM on one checkpoint, timed and scored, end to end."""
import csv

import pytest

from conftest import assert_refused, load_lesson, run_lesson, write_learnable_mnist


@pytest.fixture(scope="module")
def compare():
    return load_lesson("examples/compare_methods.py")


def test_compare_methods_times_scores_and_draws_each_method(tmp_path, monkeypatch, compare, capsys):
    monkeypatch.chdir(tmp_path)  # the metrics classifier is cached under ./outputs/metrics
    data_dir = write_learnable_mnist(tmp_path / "data")
    compare.lesson02.main(["--data-dir", str(data_dir), "--out", str(tmp_path / "l02"), "--max-steps", "3",
                           "--width", "8", "--channel-mults", "1,2", "--batch-size", "16", "--num-samples", "1"])
    out = tmp_path / "compare"
    compare.main(["--checkpoint", str(tmp_path / "l02" / "checkpoint.pt"), "--data-dir", str(data_dir),
                  "--steps", "5,10", "--eta", "0,1", "--num-samples", "6", "--batch-size", "4", "--device", "cpu", "--out", str(out)])
    with open(out / "compare.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["method"], row["steps"], row["eta"]) for row in rows] == [
        ("DDPM", "1000", ""), ("DDIM", "5", "0.0"), ("DDIM", "10", "0.0"), ("DDIM", "5", "1.0"), ("DDIM", "10", "1.0")]
    ddpm, *ddim = (float(row["seconds"]) for row in rows)
    assert max(ddim) < ddpm  # 5 or 10 network calls per batch against 1000
    assert float(rows[1]["speedup"]) > 5
    for row in rows:
        assert float(row["fd"]) >= 0 and float(row["fd_real_floor"]) >= 0 and 0 <= float(row["class_entropy_bits"])
    assert (out / "compare.png").stat().st_size > 0
    assert "| DDIM | 5 | 1.0 |" in (out / "compare.md").read_text()
    assert f"wrote {out / 'compare.png'}" in capsys.readouterr().out
    assert (tmp_path / "outputs" / "metrics" / "classifier-mnist.pt").is_file()


@pytest.mark.parametrize("flags,expected", [
    (["--steps", "10,2000"], "step counts must lie in 1..1000"),
    (["--steps", "ten"], "not a comma-separated list"),
    (["--eta", "0,-1"], "every eta must be a finite number of at least 0"),
    (["--num-samples", "0"], "--num-samples: must be at least 1"),
])
def test_bad_flags_exit_2_with_one_line(flags, expected, tmp_path, compare, capsys):
    assert_refused(compare.parse_args, ["--out", str(tmp_path / "out"), *flags], expected, capsys)


def test_a_missing_checkpoint_is_one_line(tmp_path):
    result = run_lesson("examples/compare_methods.py", "--checkpoint", tmp_path / "none.pt", "--out", tmp_path)
    assert result.returncode == 1 and result.stderr.strip() == f"error: no checkpoint at {tmp_path / 'none.pt'}"
