"""BERT-large (340M parameters; Devlin et al., 2019): masked-LM pretraining, no next-sentence prediction.

Command:   experiments/bert.sh bert_large gs://BUCKET/bert_large   (train, then MLM loss/accuracy)
Hardware:  TPU v4-64 class (the paper: 64 Cloud TPU chips for 4 days).
Time:      1M steps of 256 x 512 tokens; about 4 days on the paper's hardware.
Expected:  the paper reports downstream scores only (MNLI-m 86.7 after fine-tuning,
           which jaxlm does not do); jaxlm reports MLM accuracy beside the unigram baseline.
Data:      English Wikipedia via TFDS (docs/data.md); BooksCorpus is not available.
"""

from jaxlm.config import presets

PAPER_PARAMS = 3.4e08


def get_config():
  c = presets.bert(large=True)
  # The plan for the slice the docstring names, so the step fits there as written (v4-64 (32 chips): 4 rows per chip
  # per micro-batch): fsdp over the devices the other axes leave; checked by benchmarks/fit_paper_configs.py.
  presets.slice_plan(c, remat_policy="full", micro_batches=2)
  return c
