"""A few random flag combinations per lesson (tests/fuzz_flags.py has the generator and runs more of them):
each one runs a short smoke or is refused in one line, never a traceback."""
from conftest import load_lesson


def test_random_flag_combinations_run_or_are_refused_in_one_line(capsys):
    fuzz = load_lesson("tests/fuzz_flags.py")
    assert fuzz.main(["--runs", "5", "--seed", "3", "--max-timesteps", "21"]) == 0, capsys.readouterr().out
    assert "5 runs, 0 failures" in capsys.readouterr().out
