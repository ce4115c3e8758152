"""jaxlm's own imports form no cycle: every `import` in every module, at the top or inside a function."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jaxlm"


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
        base = name.split(".")[:len(name.split(".")) - node.level + (1 if is_package else 0)]
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
        return stack[stack.index(nxt):] + [nxt]
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


def import_graph() -> dict[str, set[str]]:
  names = module_names(PACKAGE)
  return {name: imports_of(name, path, set(names)) for name, path in names.items()}


def test_find_cycle_finds_a_cycle_and_accepts_a_tree():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_imports_inside_functions():
  graph = import_graph()
  assert "jaxlm.spm" in graph["jaxlm.trainer"]  # imported inside load_tokenizer
  assert "jaxlm.data" in graph["jaxlm.families.decoder"]
  assert "jaxlm.families" in graph["jaxlm.decode"]


def test_jaxlm_has_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)
