"""BERT-base (110M parameters; Devlin et al., 2019): masked-LM pretraining, no next-sentence prediction.

Command:   experiments/bert.sh bert_base gs://BUCKET/bert_base   (train, then MLM loss/accuracy)
Hardware:  TPU v4-16 class (the paper: 16 Cloud TPU chips for 4 days).
Time:      1M steps of 256 x 512 tokens; about 4 days on the paper's hardware.
Expected:  the paper reports downstream scores only (MNLI-m 84.6 after fine-tuning,
           which jaxlm does not do); jaxlm reports MLM accuracy beside the unigram baseline.
Data:      English Wikipedia via TFDS (docs/data.md); BooksCorpus is not available.
"""

from jaxlm.config import presets

PAPER_PARAMS = 1.1e08


def get_config():
  c = presets.bert(large=False)
  # The plan for the slice the docstring names, so the step fits there as written (v4-16 (8 chips): 8 rows of 512
  # tokens per chip per micro-batch): fsdp over the devices the other axes leave; checked by
  # benchmarks/fit_paper_configs.py.
  presets.slice_plan(c, remat_policy="full", micro_batches=4)
  return c
