"""Offline classification from a pretrained encoder: configs/stdlib_classify.py's task, starting from the
stdlib BERT (configs/stdlib_bert.py) through `train.init_from`, against the same model from scratch.

Command:   jaxlm train --config configs/stdlib_bert.py --workdir runs/stdlib_bert          (pretraining)
           jaxlm train --config configs/stdlib_classify_bert.py --workdir runs/stdlib_classify_bert
           jaxlm eval --workdir runs/stdlib_classify_bert
           (from scratch: add --config.train.init_from= ; all of it: experiments/classify_pretrained.sh)
Hardware:  2-core x86-64 CPU (CI-sized machine, shared with other jobs), float32.
Time:      measured 4.3 min of pretraining (350 steps), then 3.7 min for this run and 3.8 min from scratch
           (300 steps each); 13.4 min in all for experiments/classify_pretrained.sh, the three `jaxlm eval`s
           included, on a 2-core AMD EPYC with one other job (load ~2), 2026-11-30.
Expected:  measured 2026-11-30 (one run each, 839 validation functions; the BERT run: MLM accuracy 0.395):
             from the stdlib BERT, 300 steps:   loss 1.470, accuracy 0.405, macro P/R/F1 0.245/0.267/0.241
             the same model from scratch, 300: loss 1.800, accuracy 0.281, macro P/R/F1 0.168/0.172/0.152
             majority class (asyncio):          accuracy 0.217, macro F1 0.036
             naive Bayes on identifier words:   accuracy 0.863, macro P/R/F1 0.896/0.828/0.853
           Pretraining on the library's source lifts accuracy by 0.12 and macro F1 by 0.09 at the same
           steps; both stay far below the bag-of-words baseline, which sees identifiers whole.
The body (embeddings and the 4 post-norm layers) is copied from the BERT run, the [CLS] head starts
fresh and the MLM head is dropped; the model section is the BERT run's, so rows are its 128 bytes.
"""

from pathlib import Path

from jaxlm import config as config_lib

PAPER_PARAMS = None  # no paper figure: the baselines and the from-scratch run are the reference


def get_config():
  c = config_lib.load_config_file(str(Path(__file__).with_name("stdlib_classify.py")))
  # The BERT run's model section, so a run from scratch has the same shape as one from its weights.
  c.model = config_lib.load_config_file(str(Path(__file__).with_name("stdlib_bert.py"))).model
  c.model.family = "encoder_classifier"
  c.model.num_classes = 10
  c.data.seq_len = 128  # the BERT run's max_len
  c.train.init_from = "runs/stdlib_bert"  # experiments/classify_pretrained.sh passes its own
  return c
