"""GPT-3 6.7B (Brown et al., 2020, Table 2.1): 32 layers, d_model 4096, d_head 128, 2M tokens (1024 x 2048), lr 0.00012.

The table is consistent here: 32 heads x 128 = d_model 4096.

Command:   experiments/gpt.sh gpt3_6_7b gs://BUCKET/gpt3_6_7b   (train, then evaluate)
Hardware:  v4-1024 (bfloat16 compute; raise mesh.fsdp / mesh.tensor for the large rows).
Time:      about 1-2 weeks for the paper's 300B tokens (estimate, not measured).
Expected:  the paper's validation loss curves (Figure 3.1) and zero-shot results (Table 3.2 onward; 175B:
           LAMBADA perplexity 3.00, accuracy 76.2%). jaxlm reports C4 validation loss/perplexity with its
           own SentencePiece vocabulary, so the numbers are not directly comparable.
Data:      C4 via TFDS (docs/data.md); GPT-3's training mix is not public.
"""

from jaxlm.config import presets

PAPER_PARAMS = 6.7e09


def get_config():
  c = presets.gpt3("6.7b")
  # The plan for the slice the docstring names, so the step fits there as written (v4-1024 (512 chips): 2 rows per
  # chip): fsdp over the devices the other axes leave; checked by benchmarks/fit_paper_configs.py.
  presets.slice_plan(c, remat_policy="full", micro_batches=1)
  return c
