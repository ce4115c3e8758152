"""Code summarization with the default decoder: LoRA adapters over it, frozen, as prompt -> completion.

Command:   jaxlm train --config configs/default.py --workdir runs/default        (pretraining, README command 1)
           jaxlm train --config configs/codesum_decoder_lora.py --workdir runs/codesum_decoder_lora
           jaxlm eval --workdir runs/codesum_decoder_lora
           (all of it, and the full fine-tune of configs/codesum_decoder.py: experiments/codesum_decoder.sh)
Hardware:  2-core x86-64 CPU (CI-sized machine, shared), float32.
Time:      measured 7.3 min of training (300 steps at 1.1-1.8 s/step) and 91 s of evaluation (beam 4 over
           all 216 validation pairs), after the same 27.8 min of pretraining as configs/codesum_decoder.py,
           on a 2-core AMD EPYC shared with other jobs (load 3-9), 2026-11-29.
Expected:  measured (one run): validation loss 1.681 nats/byte on the summaries and their EOS (1.774 at
           step 150), sacrebleu BLEU 0.48 with beam 4 (0.28 greedy); full fine-tuning: 1.546, BLEU 0.41
           (0.45 greedy); the encoder-decoder (configs/codesum_transformer.py): 2.28, BLEU 0.73; the
           baselines on the same references: most common training summary 0.07, name split into words
           0.14. Trainable parameters: 147,456 adapters (4.5% of the 3,291,648 that full fine-tuning
           trains). LoRA's loss is 0.13 nats/byte behind full fine-tuning at the same steps; its higher
           beam BLEU is noise (greedy reverses the order; see configs/codesum_decoder.py).
Data, steps and evaluation are configs/codesum_decoder.py's; only the trained parameters differ:
rank-8 adapters on every projection of the 4 layers (query, key, value, out, up, down).
"""

from pathlib import Path

from jaxlm import config as config_lib


def get_config():
  c = config_lib.load_config_file(str(Path(__file__).with_name("codesum_decoder.py")))
  c.train.init_from = ""  # the adapters sit on the base; its weights are not copied into this run
  c.lora.rank = 8
  c.lora.targets = "query,key,value,out,up,down"
  c.lora.base_workdir = "runs/default"  # experiments/codesum_decoder.sh passes its own
  c.optim.learning_rate = 3e-3  # adapters start at zero and take a larger step than full fine-tuning
  c.optim.weight_decay = 0.0
  return c
