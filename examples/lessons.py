"""The one loader of lesson files. Their names start with a digit, so `import` cannot load them; the examples,
the benchmarks, GETTING_STARTED.py and the tests all load them through load_lesson below. Importing this module
loads no lesson: each is read when it is asked for."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_lesson(filename, module_name=None):
    """Import a lesson file by its path relative to the repository (e.g. "04_ddim_fast_sampling.py") and return
    the module. `module_name` names it in tracebacks and pickles (default: the file's stem). Each call executes
    the file afresh, so a caller that changes a module-level value changes only its own copy.
    Raises FileNotFoundError when the file does not exist."""
    path = ROOT / filename
    if not path.is_file():
        raise FileNotFoundError(f"no lesson file {path}")
    spec = importlib.util.spec_from_file_location(module_name or Path(filename).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
