"""TensorFlow Datasets sources, read without TensorFlow.

`tfds.data_source` gives random access over datasets prepared as array_record
(docs/datasets.md shows how to prepare them on a machine with internet). It is
called with `download=False`: a missing dataset is a one-line `ConfigError`
naming the keys and the `tfds build` command, never a download at run time.

Prepared data holds bytes, `tfds.testing.mock_data` str; both are handled.

`data.source=tfds` reads and tokenizes the whole split in every process, which
suits small datasets. Large ones (C4) go through `jaxlm prepare`, which reads a
range of examples per shard by random access and writes token shards that each
training process reads only its own blocks of (jaxlm/data/shards.py); a split of
more than `LARGE_SPLIT` examples read here gets a warning saying so.
"""

from __future__ import annotations

import warnings

from jaxlm.config import ConfigError

# Above this many examples, reading a split into every process's memory is the wrong path: say so before reading.
LARGE_SPLIT = 1_000_000


def split_name(data_config, split: str) -> str:
  """jaxlm's 'train'/'validation' -> the dataset's split names from the config."""
  return data_config.tfds_train_split if split == "train" else data_config.tfds_eval_split


def data_source(data_config, split: str):
  """The random-access `tfds.data_source` of the data sub-config's dataset and `split` (no TensorFlow)."""
  import tensorflow_datasets as tfds  # local: only tfds runs pay for the import

  name = data_config.tfds_name
  if "_translate" in name:
    import tensorflow_datasets.translate  # noqa: F401  (the WMT builders register on import)
  tfds_split = split_name(data_config, split)
  try:
    return tfds.data_source(name, split=tfds_split, data_dir=data_config.tfds_data_dir or None, download=False)
  except Exception as e:  # tfds raises several types for "not prepared"; all mean the same here
    where = data_config.tfds_data_dir or "TFDS's default data dir"
    raise ConfigError(
      f"data.tfds_name '{name}' split '{tfds_split}' is not prepared as array_record in {where} "
      f"({type(e).__name__}); run `tfds build {name} --file_format=array_record --data_dir=DIR` on a machine "
      "with internet and pass --config.data.tfds_data_dir=DIR (see docs/datasets.md)"
    ) from None


def as_text(value) -> str:
  """A feature value as str: prepared data holds bytes, mocked data str."""
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def num_examples(data_config, split: str) -> int:
  """Examples of the split that jaxlm reads: all, or at most data.max_examples."""
  count = len(data_source(data_config, split))
  return min(count, data_config.max_examples) if data_config.max_examples else count


def _records(data_config, split: str, first: int = 0, end: int | None = None):
  source = data_source(data_config, split)
  end = num_examples(data_config, split) if end is None else end
  if end - first > LARGE_SPLIT:
    warnings.warn(
      f"jaxlm: WARNING: reading {end - first:,} examples of {data_config.tfds_name} into memory in every process; "
      "tokenize them once with `jaxlm prepare --config.data.source=tfds --out DIR` and train with "
      "--config.data.source=prepared --config.data.prepared_dir=DIR (docs/data.md), or cap data.max_examples",
      stacklevel=2,
    )
  # One index at a time: the mocked source's batched __getitems__ is broken in tfds 4.9.10.
  return (source[i] for i in range(first, end))


def _feature(record, key: str, data_config, key_name: str):
  if key not in record:
    raise ConfigError(
      f"data.{key_name}='{key}' is not a feature of {data_config.tfds_name} "
      f"(it has {', '.join(sorted(record))}); set --config.data.{key_name}"
    )
  return record[key]


def load_documents(data_config, split: str, first: int = 0, end: int | None = None) -> list[bytes]:
  """The text feature of examples [first, end) (default: all), as UTF-8 documents for `data.TokenStream`."""
  return [
    as_text(_feature(r, data_config.text_key, data_config, "text_key")).encode("utf-8")
    for r in _records(data_config, split, first, end)
  ]


def load_pairs(data_config, split: str) -> list[tuple[str, str]]:
  """(source, target) sentence pairs of a translation dataset."""
  return [
    (
      as_text(_feature(r, data_config.source_key, data_config, "source_key")),
      as_text(_feature(r, data_config.target_key, data_config, "target_key")),
    )
    for r in _records(data_config, split)
  ]
