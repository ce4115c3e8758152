import ast

import pytest
from support import tiny_config

from jaxlm import config as config_lib
from jaxlm.data import corpus
from jaxlm.data import tokenizer as tokenizer_lib
from jaxlm.tasks import codesum, evaluate, seq2seq
from jaxlm.training import trainer

SYNTHETIC = '''\
import functools


def top_level(x, y=1):
    """Add two numbers together.

    The second paragraph must not leak either.
    """
    # keep this comment
    return x + y


def undocumented(x):
    return x


def too_short():
    """Short."""
    return 0


class Reader:
    """Classes are not pairs themselves."""

    @functools.lru_cache
    def read_header(self, size):
        """
        Read the file header bytes.
        """
        def check(value):
            """Check one header value for sanity."""
            return value > 0
        return [check(v) for v in range(size)]

    def abstract(self):
        """Subclasses must override this method."""


async def fetch_all(urls):
    """Fetch every url concurrently, in order."""
    return urls


def one_liner(): "Return nothing at all, quickly."; return None
'''


@pytest.fixture
def synthetic_pairs(tmp_path):
  path = tmp_path / "module.py"
  path.write_text(SYNTHETIC)
  return {pair.name: pair for pair in codesum.extract_pairs(path, "pkg/module.py")}


def test_extracts_functions_methods_nested_and_async(synthetic_pairs):
  assert sorted(synthetic_pairs) == [
    "pkg.module.Reader.abstract",
    "pkg.module.Reader.read_header",
    "pkg.module.Reader.read_header.check",
    "pkg.module.fetch_all",
    "pkg.module.one_liner",
    "pkg.module.top_level",
  ]
  assert all(pair.path == "pkg/module.py" for pair in synthetic_pairs.values())


def test_summary_is_first_nonempty_docstring_line(synthetic_pairs):
  assert synthetic_pairs["pkg.module.top_level"].summary == "Add two numbers together."
  assert synthetic_pairs["pkg.module.Reader.read_header"].summary == "Read the file header bytes."


def test_docstring_removed_rest_kept(synthetic_pairs):
  source = synthetic_pairs["pkg.module.top_level"].source
  assert source == "def top_level(x, y=1):\n    # keep this comment\n    return x + y"
  for pair in synthetic_pairs.values():
    assert pair.summary not in pair.source
    assert "leak" not in pair.source
    function = ast.parse(pair.source).body[0]  # dedented, so it parses alone
    assert ast.get_docstring(function) is None


def test_method_dedented_with_decorator_and_nested_docstring(synthetic_pairs):
  source = synthetic_pairs["pkg.module.Reader.read_header"].source
  assert source.startswith("@functools.lru_cache\ndef read_header(self, size):\n    def check")
  # Only the function's own docstring goes; the nested one is part of its body.
  assert "Check one header value" in source


def test_docstring_only_and_one_line_bodies_stay_valid(synthetic_pairs):
  assert synthetic_pairs["pkg.module.Reader.abstract"].source == "def abstract(self):\n    pass"
  assert synthetic_pairs["pkg.module.one_liner"].source == "def one_liner(): return None"


def test_package_init_names_the_package(tmp_path):
  path = tmp_path / "__init__.py"
  path.write_text('def f():\n    """Do the package thing."""\n')
  assert [pair.name for pair in codesum.extract_pairs(path, "pkg/__init__.py")] == ["pkg.f"]


def test_bad_files_are_skipped(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text('def f(:\n    """Never parsed at all."""\n')
  assert codesum.extract_pairs(broken, "broken.py") == []
  undecodable = tmp_path / "undecodable.py"
  undecodable.write_bytes(b'def f():\n    """Caf\xe9 au lait please."""\n')
  assert codesum.extract_pairs(undecodable, "undecodable.py") == []


def test_coding_cookie_is_honoured(tmp_path):
  path = tmp_path / "latin.py"
  path.write_bytes(b'# -*- coding: latin-1 -*-\ndef f():\n    """Caf\xe9 au lait please."""\n')
  [pair] = codesum.extract_pairs(path, "latin.py")
  assert pair.summary == "Caf\u00e9 au lait please."


def test_real_stdlib_gives_thousands_of_pairs():
  train, validation = codesum.load_pairs("train"), codesum.load_pairs("validation")
  assert len(train) + len(validation) > 3000
  assert validation
  assert all(len(pair.source) <= 2000 for pair in train + validation)


def test_splits_deterministic_and_disjoint_by_file():
  for val_fraction in (0.05, 0.5):
    train = codesum.load_pairs("train", val_fraction)
    validation = codesum.load_pairs("validation", val_fraction)
    assert codesum.load_pairs("validation", val_fraction) == validation
    train_files, validation_files = {p.path for p in train}, {p.path for p in validation}
    assert not train_files & validation_files
    assert all(corpus.split_of(path, val_fraction) == "validation" for path in validation_files)
    keys = [(pair.source, pair.summary) for pair in train]
    assert len(keys) == len(set(keys))
    assert not {pair.source for pair in train} & {pair.source for pair in validation}


def test_max_source_chars_and_unknown_split():
  assert all(len(p.source) <= 300 for p in codesum.load_pairs("validation", max_source_chars=300))
  with pytest.raises(ValueError, match="'test'"):
    codesum.load_pairs("test")


@pytest.mark.parametrize(
  "name,words",
  [
    ("read_file_header", "Read file header"),
    ("json.decoder.JSONDecoder.decode", "Decode"),
    ("JSONDecoder", "Json decoder"),
    ("parseHTTPResponse", "Parse http response"),
    ("__init__", "Init"),
    ("md5_hex2", "Md 5 hex 2"),
    ("_", "_"),
  ],
)
def test_name_words(name, words):
  assert codesum.name_words(name) == words


def test_baselines():
  def pair(name, summary):
    return codesum.Pair(source="", summary=summary, name=name, path="x.py")

  train = [pair("a", "Return b."), pair("b", "Return a."), pair("c", "Return a."), pair("d", "Return b.")]
  eval_pairs = [pair("m.get_value", "Get the value."), pair("m.Cls.setUp", "Set up.")]
  predictions = codesum.baseline_predictions(train, eval_pairs)
  assert predictions["most_common"] == ["Return a.", "Return a."]  # tie -> alphabetical
  assert predictions["name_words"] == ["Get value", "Set up"]


def test_bleu():
  references = ["Return the value of the named attribute.", "Open the file for reading."]
  assert codesum.bleu(references, references) == pytest.approx(100.0)
  assert codesum.bleu(["Zebra quantum lettuce.", "Purple engine sings."], references) < 5
  with pytest.raises(ValueError):
    codesum.bleu(["one"], references)


def test_decoder_rows_weight_the_summary_and_its_eos_only():
  tokenizer = tokenizer_lib.ByteTokenizer()
  long_source = "def long(x):\n" + "    x += 1\n" * 20
  pairs = [("def f(x):\n    return x", "Return x unchanged."), (long_source, "Count up slowly.")]
  rows = seq2seq.PromptCompletionRows(pairs, tokenizer, [tokenizer.eos_id], seq_len=64, target_len=24)
  separator = list(tokenizer.encode(seq2seq.SEPARATOR))
  for index, (source, summary) in enumerate(pairs):
    example = rows.examples[index]
    prompt = rows.prompt(index)
    # The prompt: EOS, the start of the source (the long one cut to fit), then the separator.
    assert prompt[0] == tokenizer.eos_id and prompt[-len(separator) :] == separator
    assert source.startswith(tokenizer.decode(prompt[1 : -len(separator)]))
    assert len(example.tokens) - 1 <= 64
    # Loss weight 1 exactly on the summary and its EOS.
    assert list(example.tokens[example.answer_mask]) == list(tokenizer.encode(summary)) + [tokenizer.eos_id]
    assert not example.answer_mask[: len(prompt)].any() and example.answer_mask[len(prompt) :].all()
  assert len(rows.prompt(1)) == 64 - 24  # the long source fills the row but the target's share
  assert rows.rows == [[0], [1]]  # the two do not fit one row together
  row = rows[0]  # in a built row, the weighted targets are the summary and EOS
  weighted = row["targets"][row["weights"] > 0]
  assert tokenizer.decode(weighted[:-1]) == "Return x unchanged." and weighted[-1] == tokenizer.eos_id


def test_decoder_on_codesum_needs_target_len():
  c = tiny_config()
  c.data.source = "codesum"
  with pytest.raises(config_lib.ConfigError, match="data.target_len"):
    config_lib.validate(c, 1)
  tokenizer = tokenizer_lib.ByteTokenizer()
  with pytest.raises(config_lib.ConfigError, match="lower data.target_len to at most 3"):  # 32 - 1 - 12 - 16
    seq2seq.PromptCompletionRows(
      [("def f(): pass", "Do nothing at all.")], tokenizer, [tokenizer.eos_id], seq_len=32, target_len=8
    )


def test_decoder_trains_on_codesum_and_reports_bleu_beside_baselines(tmp_path):
  c = tiny_config()
  c.data.source, c.data.max_examples = "codesum", 64
  c.data.seq_len, c.data.target_len = 64, 24
  c.train.num_steps, c.train.eval_every, c.train.checkpoint_every = 2, 2, 2
  c.eval.beam_size, c.eval.bleu_examples, c.eval.max_decode_len = 1, 2, 4
  trainer.train(c, tmp_path)
  result = evaluate.evaluate(tmp_path)
  assert result["loss"] > 0 and result["bleu_examples"] == 2 and 0.0 <= result["bleu"] <= 100.0
  assert {"baseline_most_common_bleu", "baseline_name_words_bleu"} <= set(result)
  assert "bits_per_byte" not in result  # the pairs' metrics, not the language model's
  assert f"BLEU {result['bleu']:.2f} (sacrebleu, 0-100)" in result["summary"]
