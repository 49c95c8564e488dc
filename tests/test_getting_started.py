"""GETTING_STARTED.py: version checks, the environment report, exit status and the learning path."""
import importlib.metadata

import pytest

from conftest import load_lesson


@pytest.fixture(scope="module")
def guide():
    return load_lesson("GETTING_STARTED.py")


@pytest.mark.parametrize("version,specifier,expected", [
    ("2.14.1+cu130", ">=2.3,<3", True), ("2.3.0", ">=2.3,<3", True), ("2.2.9", ">=2.3,<3", False),
    ("3.0", ">=2.3,<3", False), ("1.24", ">=1.24", True), ("0.29.1", ">=0.18", True), ("4.2", "", True),
    ("1.5", "==1.5.0", True), ("1.5.1", "!=1.5.1", False),
])
def test_version_specifiers(guide, version, specifier, expected):
    assert guide.satisfies(version, specifier) is expected


def test_reads_this_projects_requirements(guide):
    requirements = dict(guide.read_requirements(guide.ROOT / "requirements.txt"))
    assert {"torch", "torchvision", "numpy", "matplotlib", "tqdm", "imageio", "pytest"} <= set(requirements)
    assert guide.satisfies("2.14.1", requirements["torch"])  # the version this project is measured with


def test_ready_machine_exits_0_with_the_learning_path(guide, tiny_data_dir, tmp_path, capsys):
    status = guide.main(["--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "out"), "--offline",
                         "--seconds", "0.2", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert "mnist: on this machine" in printed and "fashion-mnist: not on this machine" in printed
    assert "images/s on cpu" in printed and printed.count(" here\n") == len(guide.LESSONS)
    for command, *_ in guide.LESSONS:
        assert f"python {command}" in printed
    assert printed.strip().endswith("Start with: python 01_ddpm_toy.py")


def test_a_missing_dataset_with_no_network_is_reported_and_fails(guide, tmp_path, capsys):
    status = guide.main(["--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--offline",
                         "--seconds", "0.1", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert status == 1
    assert "mnist: not on this machine" in printed and "network: no dataset mirror answers" in printed
    assert printed.strip().splitlines()[-1].startswith("Not ready: 1 problem(s). First: no MNIST or Fashion-MNIST")


def test_with_network_a_missing_dataset_is_only_a_download_away(guide, tmp_path, capsys):
    report = guide.Report()
    guide.check_data(report, tmp_path / "empty", online=True)
    assert not report.problems and "missing datasets will download" in capsys.readouterr().out


def test_a_package_outside_the_requirements_fails(guide, tiny_data_dir, tmp_path, monkeypatch, capsys):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.1.0" if name == "torch" else real(name))
    assert guide.main(["--data-dir", str(tiny_data_dir), "--out", str(tmp_path), "--offline"]) == 1
    assert "Not ready: torch 2.1.0 does not meet >=2.3,<3" in capsys.readouterr().out


def test_an_unwritable_output_folder_or_missing_device_fails(guide, tiny_data_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert guide.main(["--data-dir", str(tiny_data_dir), "--out", str(blocker / "out"), "--offline",
                       "--seconds", "0.1", "--device", "cpu"]) == 1
    assert f"FAIL  cannot write to {blocker / 'out'}" in capsys.readouterr().out
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert guide.main(["--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "o"), "--offline",
                       "--device", "cuda"]) == 1
    assert "no CUDA GPU here" in capsys.readouterr().out


def test_predictions_scale_with_the_measured_speed(guide, capsys):
    import torch

    (minutes, rate), = guide.LESSONS[4][2]  # lesson 05: measured on one day
    guide.learning_path(rate, torch.device("cpu"))  # the reference machine: its own minutes
    assert f"about {minutes:.0f} min here" in capsys.readouterr().out
    guide.learning_path(rate * 2, torch.device("cpu"))  # twice as fast: half the time
    assert f"about {minutes / 2:.0f} min here" in capsys.readouterr().out
    # Two days: 10 min at 100 images/s and 40 min at 100 images/s predict their geometric mean, 20 min;
    # a day with half the speed counts its minutes as half the work.
    assert guide.predicted_minutes([(10, 100), (40, 100)], 100) == pytest.approx(20)
    assert guide.predicted_minutes([(10, 100), (80, 50)], 100) == pytest.approx(20)
    assert guide.predicted_minutes([(10, 100), (80, 50)], 200) == pytest.approx(10)


@pytest.mark.parametrize("seconds", ["0", "-1", "nan", "inf", "soon"])
def test_a_timing_of_no_time_is_refused_in_one_line(guide, tmp_path, capsys, seconds):
    """--seconds 0 or less used to time the probe's three steps and say nothing (issue 38: no value silently
    changed); now argparse refuses it in one line, exit 2, and the check does not run."""
    with pytest.raises(SystemExit) as exit_info:
        guide.main(["--offline", "--out", str(tmp_path / "o"), "--seconds", seconds])
    err = capsys.readouterr()
    lines = err.err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert f"must be a number of seconds above 0, got {seconds}" in lines[0], lines
    assert err.out == "" and not (tmp_path / "o").exists()
