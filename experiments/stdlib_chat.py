"""Writes an offline chat dataset from the standard library: OUT/train.jsonl and OUT/validation.jsonl.

Each record is one conversation: the user shows a function (source without its
docstring, from jaxlm/tasks/codesum.py's pairs, same split by file) and asks what it
does; the assistant answers with the first line of the docstring. Usage:

    python experiments/stdlib_chat.py data/stdlib_chat   # then configs/chat_tiny.py

data/ is in .gitignore, as runs/ is: the files are made on each machine, never committed.
"""

import json
import sys
from pathlib import Path

from jaxlm.tasks import codesum

MAX_SOURCE_CHARS = 400  # short functions: a conversation fits a 512-byte row whole


def conversation(pair: codesum.Pair) -> dict:
  """{'messages': [user: the function and the question, assistant: its docstring's first line]}."""
  question = f"What does `{pair.name}` do?\n\n{pair.source}"
  return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": pair.summary}]}


def main(out: str) -> None:
  folder = Path(out)
  folder.mkdir(parents=True, exist_ok=True)
  for split in codesum.SPLITS:
    pairs = codesum.load_pairs(split, max_source_chars=MAX_SOURCE_CHARS)
    lines = [json.dumps(conversation(pair)) for pair in pairs]
    (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    print(f"{folder / f'{split}.jsonl'}: {len(lines)} conversations")


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python experiments/stdlib_chat.py OUT_DIR")
  main(sys.argv[1])
