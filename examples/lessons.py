"""The lesson files, for the examples: their names start with a digit, so `import` cannot load them."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_lesson(filename):
    """Import a lesson file by its name relative to the repository (e.g. "04_ddim_fast_sampling.py")."""
    spec = importlib.util.spec_from_file_location(Path(filename).stem, ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
