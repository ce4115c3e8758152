"""jaxlm's own imports form no cycle: every `import` in every module, at the top or inside a function."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "jaxlm"


def module_names(root: Path) -> dict[str, Path]:
  """'jaxlm.x.y' -> its file, for every module and package of `root`."""
  names = {}
  for path in root.rglob("*.py"):
    parts = path.relative_to(root.parent).with_suffix("").parts
    names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return names


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
  """The jaxlm modules `name` imports anywhere in its source (and the packages above them)."""
  is_package = path.name == "__init__.py"
  targets = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against this module's package
        base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module
      targets.add(module)
      targets.update(f"{module}.{alias.name}" for alias in node.names)
  edges = set()
  for target in targets:
    parts = target.split(".")
    for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
      prefix = ".".join(parts[:i])
      # A module's own packages are always initialized (or initializing) before it runs: not an edge.
      if prefix in known and prefix != name and not name.startswith(prefix + "."):
        edges.add(prefix)
  return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def runs_no_import(path: Path) -> bool:
  """True for a module with no import statement (a docstring-only package `__init__`)."""
  return not any(isinstance(node, (ast.Import, ast.ImportFrom)) for node in ast.walk(ast.parse(path.read_text())))


def import_graph() -> dict[str, set[str]]:
  names = module_names(PACKAGE)
  # Importing `jaxlm.data.sources` runs the package `jaxlm.data` first; its docstring-only `__init__` runs
  # nothing, so passing through it is no dependence on the data stage.
  known = {name for name, path in names.items() if not (path.name == "__init__.py" and runs_no_import(path))}
  return {name: imports_of(name, path, known) for name, path in names.items()}


def test_find_cycle_finds_a_cycle_and_accepts_a_tree():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_imports_inside_functions():
  graph = import_graph()
  assert "jaxlm.data.spm" in graph["jaxlm.training.trainer"]  # imported inside load_tokenizer
  assert "jaxlm.data.pipeline" in graph["jaxlm.families.decoder"]
  assert "jaxlm.families" in graph["jaxlm.inference.decode"]


def test_jaxlm_has_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The stages, lowest first. A module may import modules of its own stage and of lower stages only; the
# registries that hold a stage's choices (`jaxlm.families`, `jaxlm.data.sources`) sit low, so the config can
# consult them, and find the implementations that register there at run time (docs/architecture.md).
STAGES = [
  ("jaxlm.errors", "jaxlm.runtime"),
  ("jaxlm.storage",),
  ("jaxlm.ops",),
  ("jaxlm.families:registry", "jaxlm.data.sources"),
  ("jaxlm.config",),
  ("jaxlm.parallel",),
  ("jaxlm.models",),
  ("jaxlm.data",),
  ("jaxlm.loader", "jaxlm.inference.score"),  # scoring reads a loaded run only, and `Run.score` calls it
  ("jaxlm.inference",),
  ("jaxlm.training",),
  ("jaxlm.tasks",),
  ("jaxlm.families",),
  ("jaxlm.hf",),
  ("jaxlm.cli", "jaxlm.__main__", "jaxlm"),
]


def stage_of(name: str) -> int:
  """The index in STAGES of module `name`: its longest matching prefix ('jaxlm.families:registry' is the
  registry module itself, below the family implementations of its package)."""
  if name == "jaxlm.families":
    name = "jaxlm.families:registry"
  best, best_length = None, -1
  for index, prefixes in enumerate(STAGES):
    for prefix in prefixes:
      if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_length:
        best, best_length = index, len(prefix)
  assert best is not None, f"{name} is in no stage of STAGES; add it"
  return best


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  """'a -> b' for every import of a module `b` of a higher stage than `a`'s."""
  return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if stage_of(b) > stage_of(a))


def test_upward_imports_are_found():
  assert upward_imports({"jaxlm.data.corpus": {"jaxlm.training.trainer"}}) == [
    "jaxlm.data.corpus -> jaxlm.training.trainer"
  ]
  assert upward_imports({"jaxlm.families.decoder": {"jaxlm.families", "jaxlm.inference.decode"}}) == []
  assert upward_imports({"jaxlm.config": {"jaxlm.families"}}) == []
  assert upward_imports({"jaxlm.families": {"jaxlm.families.decoder"}}) == ["jaxlm.families -> jaxlm.families.decoder"]


def test_no_stage_imports_a_higher_one():
  """Storage, data and models never import training, inference or cli; no stage reaches above itself."""
  assert upward_imports(import_graph()) == []


def test_the_top_of_the_package_stays_small():
  top = sorted(path.name for path in PACKAGE.glob("*.py"))
  assert len(top) <= 8, top
