"""GPT-3 125M (Brown et al., 2020, Table 2.1): 12 layers, d_model 768, d_head 64, 0.5M tokens (256 x 2048), lr 0.0006.

The table is consistent here: 12 heads x 64 = d_model 768.

Command:   experiments/gpt.sh gpt3_small gs://BUCKET/gpt3_small   (train, then evaluate)
Hardware:  v4-64 (bfloat16 compute; raise mesh.fsdp / mesh.tensor for the large rows).
Time:      about 2 days for the paper's 300B tokens (estimate, not measured).
Expected:  the paper's validation loss curves (Figure 3.1) and zero-shot results (Table 3.2 onward; 175B:
           LAMBADA perplexity 3.00, accuracy 76.2%). jaxlm reports C4 validation loss/perplexity with its
           own SentencePiece vocabulary, so the numbers are not directly comparable.
Data:      C4 via TFDS (docs/data.md); GPT-3's training mix is not public.
"""

from jaxlm.config import presets

PAPER_PARAMS = 1.25e08


def get_config():
  c = presets.gpt3("small")
  # The plan for the slice the docstring names, so the step fits there as written (v4-64 (32 chips): 2 rows of 2048
  # tokens per chip per micro-batch): fsdp over the devices the other axes leave; checked by
  # benchmarks/fit_paper_configs.py.
  presets.slice_plan(c, remat_policy="full", micro_batches=4)
  return c
