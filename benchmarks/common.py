"""What the benchmark scripts share: loading a lesson file, and writing a result table as CSV and markdown."""
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # so that lessons can import utils

from examples.lessons import load_lesson  # noqa: E402,F401  (the one loader of lesson files)


def write_results(rows, stem, footer, ratio_header="ratio to default"):
    """rows of {measure, value, ratio} -> RESULTS/stem.csv and stem.md (a table, then `footer`); prints the md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{stem}.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["measure", "value", "ratio"])
        writer.writeheader()
        writer.writerows(rows)
    table = [f"| measure | value | {ratio_header} |", "|---|---|---|"]
    table += [f"| {row['measure']} | {row['value']} | {row['ratio']} |" for row in rows]
    text = "\n".join(table) + f"\n\n{footer}\n"
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)
