"""The learner's pages: every pointer to a section names one that exists, every link and picture is there, and
every lesson's time is the same number in its docstring, the README and its docs page."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SOURCES = sorted(p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts)
LESSONS = ["01_ddpm_toy.py", "02_ddpm.py", "03_conditional_ddpm.py", "04_ddim_fast_sampling.py",
           "05_latent_diffusion.py"]

# A pointer names a page and then a section in quotes: README "Quick start", docs/lesson04.md "Inversion",
# README, 'Lesson 04' (in Python source the quotes may be escaped: \"...\").
POINTER = re.compile(r"""(README(?:\.md)?|(?:\.\./)?docs/[\w./-]+?\.md|(?<![\w/.])[\w-]+\.md)[,:]?\s+(?:section\s+)?"""
                     r"""(?:\\?"([^"\\\n]{2,80})\\?"|'([^'\n]{2,80})')""")
# Inside a page: section "Heading" (or "Heading" below/above) means a heading of the same page.
SAME_PAGE = re.compile(r'(?:section|sections)\s+"([^"\n]{2,80})"')
LINK = re.compile(r"\]\(([^)\s]+)\)")


def headings(page):
    """The headings of a markdown file, as written (without #'s and backticks), outside code blocks."""
    found, in_code = [], False
    for line in Path(page).read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and re.match(r"#{1,6} ", line):
            found.append(line.lstrip("#").strip().replace("`", ""))
    return found


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def page_path(name, base):
    """The file a pointer's page name means, from the file `base` it is written in."""
    if name.startswith("README"):
        return ROOT / "README.md"
    if name.startswith("docs/"):
        return ROOT / name
    return (base.parent / name).resolve()


def broken_pointers(text, base):
    """[(pointer, why)] for each section pointer in `text` (written in file `base`) that names no section."""
    broken = []
    for page, double, single in POINTER.findall(text):
        section = double or single
        target = page_path(page, base)
        if not target.is_file():
            broken.append((f'{page} "{section}"', "no such page"))
        elif section not in headings(target):
            broken.append((f'{page} "{section}"', f"no such section in {target.relative_to(ROOT)}"))
    if base.suffix == ".md":
        for section in SAME_PAGE.findall(text):
            if section not in headings(base):
                broken.append((f'section "{section}"', f"no such section in {base.relative_to(ROOT)}"))
    return broken


def broken_links(page):
    """[(link, why)] for each relative link or picture of a markdown page whose file or anchor is missing."""
    broken, text = [], page.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append((target, "no such file"))
        elif anchor and anchor not in {slug(h) for h in headings(file)}:
            broken.append((target, "no such heading"))
    return broken


def test_the_checkers_find_a_stale_pointer_and_a_broken_link(tmp_path):
    page = ROOT / "docs" / "lesson04.md"
    assert broken_pointers('see docs/lesson04.md "Inversion"', ROOT / "x.py") == []
    assert broken_pointers('help="(docs/lesson04.md \\"Inversion\\")"', ROOT / "x.py") == []
    assert broken_pointers('README "Speed on the CPU"', ROOT / "x.py") != []
    assert broken_pointers('docs/lesson09.md "Inversion"', ROOT / "x.py") != []
    assert broken_pointers('as section "No such heading" shows', page) != []
    fake = tmp_path / "page.md"
    fake.write_text("# A page\n\n## Real heading\n\n[ok](#real-heading) [bad](#nothing) ![gone](missing.png)\n")
    assert broken_links(fake) == [("#nothing", "no such heading"), ("missing.png", "no such file")]


@pytest.mark.parametrize("path", SOURCES + PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_section_pointer_names_a_section_that_exists(path):
    assert broken_pointers(path.read_text(), path) == []


def test_every_readme_mention_in_the_code_names_a_section():
    """A bare "(README)" in code sends the learner to 300 lines; each mention must say where."""
    bare = []
    for path in SOURCES:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for match in re.finditer(r"README(?:\.md)?", line):
                if not POINTER.match(line, match.start()):
                    bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert bare == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_picture_exists(page):
    assert broken_links(page) == []


def test_every_lesson_has_a_docs_page_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for number in range(1, 6):
        assert (ROOT / "docs" / f"lesson0{number}.md").is_file()
        assert f"docs/lesson0{number}.md" in readme


def test_the_readme_is_a_learners_page():
    """Short, a picture on its first screen, a grid for every lesson, no dated history."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 320
    assert any(line.startswith("![") for line in lines[:40])
    for number in range(1, 6):
        assert any(f"docs/figures/lesson0{number}_samples.png" in line for line in lines)
    dated = [line for line in lines if re.search(r"\b20\d\d-\d\d-\d\d\b", line)]
    assert dated == []


def cpu_time(text):
    """'about 10-20 min' (or 'about 2 min', 'about 65 s') in a line that starts with 'CPU:'."""
    line = next(line for line in text.splitlines() if line.strip().startswith("CPU:"))
    return re.search(r"about [\d.]+(?:-[\d.]+)? (?:min|s)\b", line).group(0)


@pytest.mark.parametrize("lesson", LESSONS)
def test_each_lessons_cpu_time_is_the_same_in_its_docstring_the_readme_and_its_page(lesson):
    """The docstring gives one undated CPU line; the README's lessons table and the lesson's page say the same."""
    docstring = (ROOT / lesson).read_text().split('"""')[1]
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", docstring)  # no dated history in a lesson's header
    time = cpu_time(docstring)
    row = next(line for line in (ROOT / "README.md").read_text().splitlines()
               if line.startswith("|") and f"`python {lesson}" in line)
    assert time in row
    page = (ROOT / "docs" / f"lesson{lesson[:2]}.md").read_text()
    assert time in page


def test_lesson_files_have_one_loader():
    """DESIGN.md: one loader of lesson files with one home (examples/lessons.py); the others import it."""
    homes = [p.relative_to(ROOT).as_posix() for p in [*SOURCES, *sorted((ROOT / "tests").glob("*.py"))]
             if "spec_from_file_location" in p.read_text() and p.name != "test_docs.py"]
    assert homes == ["examples/lessons.py"]
    from examples.lessons import load_lesson

    lesson = load_lesson("01_ddpm_toy.py", module_name="lesson01_for_this_test")
    assert lesson.__name__ == "lesson01_for_this_test" and lesson.LESSON == "01_ddpm_toy"
    with pytest.raises(FileNotFoundError, match="no lesson file"):
        load_lesson("09_no_such_lesson.py")
