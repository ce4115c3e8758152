"""The docs cannot drift: the site builds with `mkdocs build --strict`, and every Python example in README.md and
docs/ runs against the current code, in order, page by page."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO

import jaxlm

DOCS = REPO / "docs"
# A ```python block right after this line is a fragment shown for reading, not a program; every other one runs.
NOT_RUN = "<!-- not run -->"


def python_examples(path: Path) -> list[str]:
  """The ```python blocks of the Markdown file `path`, in order, leaving out those marked `NOT_RUN`."""
  text = path.read_text()
  return [
    match.group(2)
    for match in re.finditer(r"(^[^\n]*\n)?```python\n(.*?)```", text, re.M | re.S)
    if (match.group(1) or "").strip() != NOT_RUN
  ]


def run_examples(path: Path, directory: Path) -> dict:
  """Runs `path`'s examples in order in one namespace, from `directory` (which sees the repository's configs/ and
  jaxlm/, as the repository root does); returns the namespace."""
  for name in ("configs", "jaxlm"):
    (directory / name).symlink_to(REPO / name)
  namespace = {}
  for code in python_examples(path):
    exec(compile(code, str(path.relative_to(REPO)), "exec"), namespace)
  return namespace


def test_python_examples_are_found_and_fragments_can_be_left_out(tmp_path):
  page = tmp_path / "page.md"
  page.write_text(f"```python\nfirst = 1\n```\n{NOT_RUN}\n```python\nnot a program\n```\n\n```python\nlast = 2\n```\n")
  assert python_examples(page) == ["first = 1\n", "last = 2\n"]


def test_the_site_builds_strictly(tmp_path):
  """A broken link or anchor, a page left out of the nav, or an API reference to a moved name fails the build."""
  command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
  out = subprocess.run(
    command, capture_output=True, text=True, cwd=REPO, timeout=600, env=dict(os.environ, NO_MKDOCS_2_WARNING="1")
  )
  assert out.returncode == 0, out.stderr[-4000:]
  reference = (tmp_path / "site" / "reference" / "jaxlm" / "index.html").read_text()
  assert "jaxlm.loader.load" in reference and "Trainer" in reference


def module_file(parts: list[str]) -> Path | None:
  """The file of module `'.'.join(parts)` (a module or a package), or None."""
  for candidate in (REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath(*parts, "__init__.py")):
    if candidate.is_file():
      return candidate
  return None


def named_in_docs_but_missing(text: str) -> list[str]:
  """The `jaxlm/...py` paths and `jaxlm.a.b` names of `text` that do not exist: a dotted name's longest module
  prefix must hold the next name (a top-level name must be one of `jaxlm.__all__`)."""
  missing = [path for path in re.findall(r"(?<![\w/.])(jaxlm/[\w/]+\.py)", text) if not (REPO / path).is_file()]
  for dotted in re.findall(r"`(jaxlm(?:\.\w+)+)", text):
    parts = dotted.split(".")
    length = max(i for i in range(1, len(parts) + 1) if module_file(parts[:i]))
    if length == len(parts):
      continue
    name = parts[length]
    found = name in jaxlm.__all__ if length == 1 else re.search(rf"\b{name}\b", module_file(parts[:length]).read_text())
    if not found:
      missing.append(dotted)
  return missing


def test_module_paths_in_the_docs_exist():
  """Code spans are not links, so the site build does not check the modules and names the pages mention."""
  assert named_in_docs_but_missing("`jaxlm/loader.py`, `jaxlm.load`, `jaxlm.config.DEFAULT_RULES`") == []
  assert named_in_docs_but_missing("`jaxlm/trainer.py`, `jaxlm.nothing`, `jaxlm.hf.nothing`") == [
    "jaxlm/trainer.py",
    "jaxlm.nothing",
    "jaxlm.hf.nothing",
  ]
  missing = {
    page.name: named_in_docs_but_missing(page.read_text()) for page in [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
  }
  assert {page: names for page, names in missing.items() if names} == {}


def test_readme_stays_short_and_its_test_command_is_what_ci_runs():
  readme = (REPO / "README.md").read_text()
  assert len(readme.splitlines()) <= 150
  ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert f"```bash\n{ci_command}\n```" in readme
  # Every page that shows how to run the tests shows the command CI runs.
  for page in [REPO / "README.md", *DOCS.rglob("*.md")]:
    for line in page.read_text().splitlines():
      if "-m pytest" in line and "pip install" in line:
        assert line == ci_command, f"{page.relative_to(REPO)}: {line}"


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  namespace = run_examples(REPO / "README.md", tmp_path)
  assert namespace["run"].step == 4 and len(namespace["tokens"]) > 0
  assert (tmp_path / "runs" / "readme" / "checkpoints" / "4").is_dir()
  assert capsys.readouterr().out.splitlines()[-1].startswith("4 ")


@pytest.mark.slow
def test_python_api_examples_run_in_order(tmp_path, monkeypatch, capsys):
  assert len(python_examples(DOCS / "python-api.md")) == 3
  monkeypatch.chdir(tmp_path)
  namespace = run_examples(DOCS / "python-api.md", tmp_path)
  printed = capsys.readouterr().out
  assert "step 3: validation loss" in printed and "step 6: validation loss" in printed
  assert namespace["run"].step == 6 and namespace["logits_BxTxV"].shape == (1, 11, 260)
  assert (tmp_path / "runs" / "bigram" / "checkpoints" / "6").is_dir()
  bigram = [json.loads(line) for line in (tmp_path / "runs" / "bigram" / "metrics.jsonl").read_text().splitlines()]
  losses = [row["loss"] for row in bigram if "loss" in row]
  assert losses[-1] < losses[0]  # the custom objective went down


# The other pages' examples: each page runs on its own, and asserts what it shows.
OTHER_PAGES = sorted(
  path.relative_to(DOCS).as_posix()
  for path in DOCS.rglob("*.md")
  if path.name != "python-api.md" and python_examples(path)
)


def test_other_pages_with_examples_are_the_expected_ones():
  assert OTHER_PAGES == ["extending.md", "parallelism.md"]


@pytest.mark.parametrize("page", OTHER_PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  run_examples(DOCS / page, tmp_path)
