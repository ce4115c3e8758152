"""SentencePiece training (spm.py): round-trip, ids, and the copy saved with the run."""

from support import tiny_config

from jaxlm.data import spm
from jaxlm.data import tokenizer as tokenizer_lib

SENTENCES = [
  f"Return the {w} of the {v} in line {i}."
  for i in range(200)
  for w, v in [("length", "list"), ("sum", "values"), ("name", "module")]
]


def test_trained_vocabulary_round_trips_and_travels_with_the_run(tmp_path):
  path = spm.train(SENTENCES, tmp_path / "spm.model", vocab_size=36)
  tok = tokenizer_lib.SentencePieceTokenizer(path)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and tok.vocab_size == 37  # + [MASK]
  text = "Return the sum of the values in line 7."
  ids = tok.encode(text)
  assert len(ids) < len(text) and tok.decode(ids) == text
  workdir = tmp_path / "run"
  workdir.mkdir()
  tok.save(workdir)
  path.unlink()  # evaluation must need only the work directory
  assert tokenizer_lib.load(workdir).decode(ids) == text


def test_train_if_missing_trains_once(tmp_path, text_corpus):
  c = tiny_config()
  c.data.source, c.data.paths, c.data.val_fraction = "files", str(text_corpus / "*.txt"), 0.2
  c.data.tokenizer, c.data.tokenizer_path, c.data.spm_vocab_size = "sentencepiece", str(tmp_path / "t.model"), 200
  spm.train_if_missing(c)
  first = (tmp_path / "t.model").read_bytes()
  spm.train_if_missing(c)  # an existing file is reused, not retrained
  assert (tmp_path / "t.model").read_bytes() == first
  assert tokenizer_lib.from_config(c.data).vocab_size == 201
