"""GPT-3 13B (Brown et al., 2020, Table 2.1): 40 layers, d_model 5140, d_head 128, 2M tokens (1024 x 2048), lr 0.0001.

The table's d_model 5140 is not divisible by its 40 heads; d_model stays 5140 and
model.head_dim=128 (attention width 5120), which gives 12.9B, matching the 13.0B of the params column.

Command:   experiments/gpt.sh gpt3_13b gs://BUCKET/gpt3_13b   (train, then evaluate)
Hardware:  v4-2048 (bfloat16 compute; raise mesh.fsdp / mesh.tensor for the large rows).
Time:      about 2 weeks for the paper's 300B tokens (estimate, not measured).
Expected:  the paper's validation loss curves (Figure 3.1) and zero-shot results (Table 3.2 onward; 175B:
           LAMBADA perplexity 3.00, accuracy 76.2%). jaxlm reports C4 validation loss/perplexity with its
           own SentencePiece vocabulary, so the numbers are not directly comparable.
Data:      C4 via TFDS (docs/data.md); GPT-3's training mix is not public.
"""

from jaxlm.config import presets

PAPER_PARAMS = 1.3e10


def get_config():
  return presets.gpt3("13b")
