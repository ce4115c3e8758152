"""GPT-3 175B (Brown et al., 2020, Table 2.1): 96 layers, d_model 12288, d_head 128, 3.2M tokens (1536 x 2048), lr 6e-05.

The table is consistent here: 96 heads x 128 = d_model 12288.

Command:   experiments/gpt.sh gpt3_175b gs://BUCKET/gpt3_175b   (train, then evaluate)
Hardware:  v4-4096 or larger (bfloat16 compute; raise mesh.fsdp / mesh.tensor for the large rows).
Time:      about 1-2 months for the paper's 300B tokens (estimate, not measured).
Expected:  the paper's validation loss curves (Figure 3.1) and zero-shot results (Table 3.2 onward; 175B:
           LAMBADA perplexity 3.00, accuracy 76.2%). jaxlm reports C4 validation loss/perplexity with its
           own SentencePiece vocabulary, so the numbers are not directly comparable.
Data:      C4 via TFDS (docs/data.md); GPT-3's training mix is not public.
"""

import json

from jaxlm.config import presets
from jaxlm.config.schema import DEFAULT_RULES

PAPER_PARAMS = 1.75e11


def get_config():
  c = presets.gpt3("175b")
  # The plan for the slice the docstring names, so the step fits there as written (v4-4096 (2048 chips): 1536 rows
  # split at most 512 ways, so fsdp 512 x tensor 4; 1 row per chip per micro-batch): fsdp over the devices the other
  # axes leave; checked by benchmarks/fit_paper_configs.py.
  presets.slice_plan(c, tensor=4, remat_policy="full", micro_batches=3)
  # The odd vocabulary (50257) cannot split over tensor: the embedding is split over fsdp only.
  c.mesh.rules = json.dumps([[name, axes] for name, axes in DEFAULT_RULES if name != "vocab"] + [["vocab", None]])
  return c
