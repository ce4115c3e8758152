"""The docs cannot drift: the site builds with `mkdocs build --strict`, and every Python example in README.md and
docs/ runs against the current code, in order, page by page."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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
  assert len(python_examples(DOCS / "python-api.md")) == 6
  monkeypatch.chdir(tmp_path)
  namespace = run_examples(DOCS / "python-api.md", tmp_path)
  printed = capsys.readouterr().out
  assert "step 3: validation loss" in printed and "step 6: validation loss" in printed
  assert namespace["run"].step == 6 and namespace["logits_BxTxV"].shape == (1, 11, 260)
  first, second = namespace["first"], namespace["second"]  # Run.score: a text past max_len is scored whole
  assert first.num_tokens == 25 and len(first.hidden_states) == 3 and second.num_tokens == 400
  assert (tmp_path / "runs" / "bigram" / "checkpoints" / "6").is_dir()
  bigram = [json.loads(line) for line in (tmp_path / "runs" / "bigram" / "metrics.jsonl").read_text().splitlines()]
  losses = [row["loss"] for row in bigram if "loss" in row]
  assert losses[-1] < losses[0]  # the custom objective went down
  assert all("max_logit" in row for row in bigram if "loss" in row)  # its extra term, reported
  assert jaxlm.load(tmp_path / "runs" / "merged").step == 0 and "step 4: accuracy" in printed


# docs/research.md: nine recipes a researcher writes, each at most 15 lines on public names only (the page states
# the rule; these functions are it). The public modules: jaxlm and those the API reference documents.
RESEARCH = DOCS / "research.md"
PUBLIC_MODULES = {"jaxlm"} | {
  module for page in (DOCS / "reference").glob("*.md") for module in re.findall(r"^# `(jaxlm[\w.]*)`", page.read_text())
}


def code_lines(code: str) -> int:
  """The lines of `code` that are neither blank nor only a comment."""
  return sum(1 for line in code.splitlines() if line.strip() and not line.strip().startswith("#"))


def private_names(code: str) -> set[str]:
  """What `code` uses beyond jaxlm's public names: a jaxlm module outside PUBLIC_MODULES, a top-level `jaxlm.X`
  that is neither in `jaxlm.__all__` nor a public module, and any imported name or attribute with a leading `_`
  (dunders aside)."""

  def public(module: str, name: str) -> bool:
    private = name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
    return not private and (module != "jaxlm" or name in jaxlm.__all__ or f"jaxlm.{name}" in PUBLIC_MODULES)

  found = set()
  for node in ast.walk(ast.parse(code)):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("jaxlm") and a.name not in PUBLIC_MODULES}
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ""
      if module.startswith("jaxlm") and module not in PUBLIC_MODULES:
        found.add(module)
      found |= {f"{module}.{a.name}" for a in node.names if not public(module if module == "jaxlm" else "", a.name)}
    elif isinstance(node, ast.Attribute):
      module = node.value.id if isinstance(node.value, ast.Name) and node.value.id == "jaxlm" else ""
      if not public(module, node.attr):
        found.add(f"{module}.{node.attr}")
  return found


def test_the_recipe_rule_catches_long_blocks_and_private_names():
  assert code_lines("import jaxlm\n\n  # a comment\nx = 1  # counted\n") == 2
  private = "import jaxlm.loader\nfrom jaxlm.models import layers\nfrom jaxlm import loader, _EXPORTS\nrun._replace()\n"
  assert private_names(private + "jaxlm.storage.fs\n") == {
    "jaxlm.loader",
    "jaxlm.models",
    "jaxlm._EXPORTS",
    "._replace",
    "jaxlm.storage",
  }
  public = "import jaxlm\nimport jaxlm.ops\nfrom jaxlm.families import model_inputs\nfrom jaxlm import config, load\n"
  assert private_names(public + "jaxlm.config.DEFAULT_RULES, jaxlm.load, x.__class__\n") == set()


def test_research_recipes_are_nine_short_blocks_on_public_names():
  assert PUBLIC_MODULES == {"jaxlm", "jaxlm.config", "jaxlm.families", "jaxlm.ops", "jaxlm.hf", "jaxlm.runtime"}
  sections = re.split(r"^## ", RESEARCH.read_text(), flags=re.M)[1:]
  assert len(sections) == 9 and all(len(python_examples_of(section)) == 1 for section in sections)
  for number, code in enumerate(python_examples(RESEARCH), 1):
    assert code_lines(code) <= 15, f"recipe {number}: {code_lines(code)} lines"
    assert private_names(code) == set(), f"recipe {number}"


def python_examples_of(markdown: str) -> list[str]:
  """The ```python blocks of a Markdown text."""
  return re.findall(r"^```python\n(.*?)```", markdown, re.M | re.S)


@pytest.mark.slow
def test_research_recipes_run_in_order(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = run_examples(RESEARCH, tmp_path)
  runs = tmp_path / "runs"
  per_layer, params = namespace["per_layer"], namespace["params"]  # 1
  assert set(per_layer) == {"layer_0", "layer_1"} and 0 < sum(per_layer.values()) < jaxlm.count_params(params)
  assert sorted(path.name for path in (runs / "parallel" / "checkpoints").iterdir() if path.name.isdigit()) == [
    "2",
    "4",
  ]  # 2: trained to step 2, then resumed to step 4
  assert namespace["summary"]["val_loss"] > 0  # 3: validated on its own split
  run, scored = namespace["run"], namespace["scored"]  # 4
  assert run.step == 2 and [text.num_tokens for text in scored] == [25, 30]
  expected = run.score(["def main():"])[0].logprobs[-1]  # 5: the saliency's objective is what Run.score reports
  assert abs(float(namespace["last_token_logprob"](namespace["embeds_BxTxD"])) - expected) < 1e-4
  saliency_T = namespace["saliency_T"]  # the last token is the target: it cannot move its own log-probability
  assert saliency_T.shape == (12,) and float(saliency_T[:-1].min()) > 0 and float(saliency_T[-1]) == 0
  assert [weights.shape for weights in namespace["weights"]] == [(1, 4, 12, 12)] * 2
  kernel = namespace["kernel"]  # 6: fsdp x tensor
  assert tuple(kernel.sharding.spec) == ("fsdp", "tensor") and len(kernel.sharding.device_set) == 8
  last = json.loads((runs / "z_loss" / "metrics.jsonl").read_text().splitlines()[-1])  # 7: both terms logged
  assert abs(last["objective"] - (last["loss"] + 1e-4 * last["log_z_squared"])) < 1e-5
  merged_run = jaxlm.load(runs / "merged")  # 8: the trained adapters, merged into a plain run
  merged = merged_run.params["decoder"]["layer_0"]["self_attention"]
  base = run.params["decoder"]["layer_0"]["self_attention"]
  assert merged_run.step == 0 and (merged["key"]["kernel"] == base["key"]["kernel"]).all()
  assert not (merged["query"]["kernel"] == base["query"]["kernel"]).all()
  window_BxNxTxS = namespace["window_weights"][0]  # 9: each query reads itself and the 3 tokens before it
  behind_TxS = np.arange(12)[:, None] - np.arange(12)[None, :]
  assert ((window_BxNxTxS > 0) == ((behind_TxS >= 0) & (behind_TxS < 4))).all()


# The other pages' examples: each page runs on its own, and asserts what it shows.
OTHER_PAGES = sorted(
  path.relative_to(DOCS).as_posix()
  for path in DOCS.rglob("*.md")
  if path.name not in ("python-api.md", "research.md") and python_examples(path)
)


def test_other_pages_with_examples_are_the_expected_ones():
  assert OTHER_PAGES == ["extending.md", "parallelism.md"]


@pytest.mark.parametrize("page", OTHER_PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  run_examples(DOCS / page, tmp_path)
