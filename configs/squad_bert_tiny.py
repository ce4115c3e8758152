"""Extractive question answering as BERT on SQuAD v1.1 (Devlin et al., 2019, section 4.2), shrunk, byte-level.

Command:   experiments/qa.sh runs/squad_bert_tiny      (jaxlm train, then jaxlm eval: exact match and F1)
           SQuAD-format JSON instead of TFDS: -- --config.data.paths=train-v1.1.json \
             --config.data.validation_paths=dev-v1.1.json
Hardware:  2-core x86-64 CPU for a look; an accelerator for a real run (88k questions, several windows each).
Time:      not measured: this machine has no SQuAD (nothing downloads here; prepare `squad` with TFDS first,
           docs/data.md). The data path, windowing and metrics are exercised by tests/unit/test_squad.py on
           TFDS mock data and hand-made JSON.
Expected:  not measured (see Time). For scale: BERT-base reaches EM 80.8 / F1 88.5 on SQuAD v1.1 dev after
           pretraining; this 4-layer byte model trained from scratch will be far below. `jaxlm eval` reports
           exact match and F1 (0-100, SQuAD v1.1 normalization, best over gold answers) beside the baseline
           that answers with the context's first words (as many as the average training answer has).
Data:      TFDS `squad` (plain_text, v3) through tfds.data_source, splits train / validation.
"""

from jaxlm.config import base_config

PAPER_PARAMS = None  # a shrunk BERT; the paper's scores are for BERT-base/large after pretraining


def get_config():
  c = base_config()
  m = c.model
  m.family = "encoder_qa"
  m.mlp = "gelu_exact"
  m.num_layers = 4
  m.d_model = 192
  m.num_heads = 4
  m.mlp_dim = 768
  m.max_len = 384
  m.norm_position = "post"
  m.norm_eps = 1e-12
  m.embed_norm = True
  m.num_token_types = 2  # question 0, context 1
  m.dropout_rate = 0.1
  c.data.source = "squad"
  c.data.tfds_name = "squad"
  c.data.tfds_train_split = "train"
  c.data.tfds_eval_split = "validation"
  c.data.seq_len = 384  # BERT's max_seq_length for SQuAD
  c.data.doc_stride = 128  # BERT's doc_stride
  c.train.global_batch_size = 32
  c.train.num_steps = 2000
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 200
  c.optim.weight_decay = 0.01
  c.eval.batch_size = 32
  c.eval.max_batches = 100
  return c
