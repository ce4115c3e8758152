"""GPT-3 13B (Brown et al., 2020, Table 2.1): 40 layers, d_model 5140, d_head 128, 2M tokens (1024 x 2048), lr 0.0001.

The table's d_model 5140 is not divisible by its 40 heads; d_model stays 5140 and
model.head_dim=128 (attention width 5120), which gives 12.9B, matching the 13.0B of the params column.

Command:   experiments/gpt.sh gpt3_13b gs://BUCKET/gpt3_13b   (train, then evaluate)
Hardware:  v5p-2048 (bfloat16 compute; d_model 5140 splits only 4 ways over fsdp, too few for 32 GiB v4 chips).
Time:      about 2 weeks for the paper's 300B tokens (estimate, not measured).
Expected:  the paper's validation loss curves (Figure 3.1) and zero-shot results (Table 3.2 onward; 175B:
           LAMBADA perplexity 3.00, accuracy 76.2%). jaxlm reports C4 validation loss/perplexity with its
           own SentencePiece vocabulary, so the numbers are not directly comparable.
Data:      C4 via TFDS (docs/data.md); GPT-3's training mix is not public.
"""

from jaxlm.config import presets

PAPER_PARAMS = 1.3e10


def get_config():
  c = presets.gpt3("13b")
  # The plan for the slice the docstring names, so the step fits there as written (v5p-2048, 1024 chips: d_model 5140
  # splits at most 4 ways, so fsdp 4 and data 256, 1 row per chip; a quarter of the state is 39 GB, too much for a v4
  # chip's 32 GiB); checked by benchmarks/fit_paper_configs.py.
  presets.slice_plan(c, data=-1, fsdp=4, remat_policy="full", micro_batches=1)
  return c
