"""Helpers the test modules of both tiers share: tiny configs, the CLI in a subprocess, session fixtures built once
under pytest-xdist, the fault cases, chat data, a Hugging Face tokenizer and model, and a classification task.

pytest puts tests/ on sys.path when it imports tests/conftest.py (its default `prepend` import mode), so test
modules import this one as `support`. The optional Hugging Face packages are imported by the helpers that use them.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from jaxlm import config as config_lib
from jaxlm.data import sources
from jaxlm.data.tokenizer import ByteTokenizer
from jaxlm.tasks import classify

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny.py")


def tiny_config(**model_overrides):
  """configs/tiny.py (2 layers, d_model 32, seq 32, batch 8), shortened to 6 steps for tests."""
  c = config_lib.load_config_file(TINY)
  for key, value in model_overrides.items():
    c.model[key] = value
  c.train.num_steps = 6
  c.train.log_every = 1
  c.train.eval_every = 3
  c.train.eval_batches = 2
  c.train.checkpoint_every = 3
  c.optim.warmup_steps = 2
  c.eval.max_batches = 2
  return c


def files_config(text_corpus: Path, **model_overrides):
  """`tiny_config` on the text files of `text_corpus`, a fifth of them held out for validation."""
  c = tiny_config(**model_overrides)
  c.data.source = "files"
  c.data.paths = str(text_corpus / "*.txt")
  c.data.val_fraction = 0.2
  return c


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test's JAX process: `devices` CPU devices, plus the suite's compiler flags (tests/conftest.py
  sets JAXLM_TESTS_XLA_FLAGS: XLA's CPU backend at optimization level 0 unless the caller chose otherwise)."""
  return f"--xla_force_host_platform_device_count={devices} {os.environ.get('JAXLM_TESTS_XLA_FLAGS', '')}".strip()


def run_cli(args: list[str], env_extra: dict | None = None, devices: int = 8, timeout: int = 600):
  """Runs `python -m jaxlm ...` in a fresh process; returns the CompletedProcess."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(devices)
  env.update(env_extra or {})
  return subprocess.run(
    [sys.executable, "-m", "jaxlm", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO
  )


def tensorboard_scalars(data: bytes) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} from the bytes of an event file (TFRecord framing around Event protos)."""
  from tensorboardX.proto import event_pb2

  scalars, offset = {}, 0
  while offset < len(data):
    length = int.from_bytes(data[offset : offset + 8], "little")
    event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
    offset += 12 + length + 4  # length, its CRC, the record, its CRC
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now (the kernel picks it, so parallel tests get different ones)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def built_once(tmp_path_factory, name: str):
  """A folder for a session fixture's files, and whether the caller must build them.

  Without pytest-xdist: a fresh temporary folder, to build. Under it: `name` in the folder all workers share
  (the parent of each worker's base folder), held under a file lock while the caller builds or reads it, so the
  first worker builds and the others wait, then read. A build that fails leaves no `.built` mark, and is tried again.

  Yields:
    (folder, build): build is True when the folder is empty and the caller must fill it.
  """
  if "PYTEST_XDIST_WORKER" not in os.environ:
    yield tmp_path_factory.mktemp(name), True
    return
  folder = tmp_path_factory.getbasetemp().parent / name
  with open(f"{folder}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    built = Path(f"{folder}.built")
    build = not built.exists()
    if build:
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
    yield folder, build
    built.touch()


def run_in_process(args: list[str], capfd) -> subprocess.CompletedProcess:
  """`jaxlm ARGS` in this process (its 8 CPU devices), as a CompletedProcess with its exit status and the output
  `capfd` captured. It saves an interpreter and JAX start-up per command, and tests share compiled functions; an
  exception fails the test, as a traceback in a subprocess would."""
  from jaxlm.cli import main

  capfd.readouterr()
  status = main.main(args)
  stdout, stderr = capfd.readouterr()
  return subprocess.CompletedProcess(args, status, stdout, stderr)


# The fault matrix (tests/integration/test_faults.py).


def train_args(corpus: Path, workdir: Path, *extra: str) -> list[str]:
  """`jaxlm train` on configs/tiny.py and `corpus`: 12 steps, a checkpoint every 4, validation at the end."""
  return [
    "train",
    "--config",
    TINY,
    "--workdir",
    str(workdir),
    "--config.data.source=files",
    f"--config.data.paths={corpus}/*.txt",
    "--config.data.val_fraction=0.2",
    "--config.train.num_steps=12",
    "--config.train.log_every=1",
    "--config.train.checkpoint_every=4",
    "--config.train.eval_every=12",
    "--config.train.eval_batches=2",
    "--config.eval.max_batches=2",
    "--config.optim.warmup_steps=2",
    *extra,
  ]


def error_line(result_or_stderr) -> str:
  """The one `jaxlm: error:` line of a failed command; fails the test on a traceback or several lines."""
  stderr = getattr(result_or_stderr, "stderr", result_or_stderr)
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if "jaxlm: error:" in line]
  assert len(lines) == 1, stderr[-3000:]
  return lines[0]


def data_files(step_dir: Path) -> list[Path]:
  """The OCDBT data files of a step's state, smallest first."""
  return sorted(
    (p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size
  )


def corrupt(step_dir: Path, how: str) -> None:
  """Damages a checkpoint step in one of the six ways of issue 11 §1 (CORRUPTIONS)."""
  if how == "flip_64_bytes":  # in the middle of the largest array file
    path = data_files(step_dir)[-1]
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))
  elif how == "flip_one_bit_per_file":
    for path in data_files(step_dir):
      data = bytearray(path.read_bytes())
      data[len(data) // 2] ^= 0x10
      path.write_bytes(bytes(data))
  elif how == "truncate_half":
    path = data_files(step_dir)[-1]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  elif how == "delete_commit_markers":
    (step_dir / "_CHECKPOINT_METADATA").unlink()
    for path in step_dir.rglob("commit_success.txt"):
      path.unlink()
  elif how == "delete_state_metadata":
    (step_dir / "state" / "_METADATA").unlink()
  elif how == "delete_data_folder":
    for folder in (step_dir / "state").glob("ocdbt.process_*/d"):
      shutil.rmtree(folder)


CORRUPTIONS = [
  "flip_64_bytes",
  "flip_one_bit_per_file",
  "truncate_half",
  "delete_commit_markers",
  "delete_state_metadata",
  "delete_data_folder",
]


# Instruction and chat data (tests/unit/test_instruct_data.py, tests/integration/test_chat.py).

CONVERSATIONS = [
  [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
  [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello.\nHow can I help?"},
    {"role": "user", "content": "Sort [3, 1]"},
    {"role": "assistant", "content": "[1, 3]"},
  ],
  [{"role": "user", "content": 'Unicode: caf\u00e9 \u2014 \U0001f600 "quotes" <b>html</b>'}],
]
RECORDS = [{"prompt": f"Q{i}: add {i} and {i}\n", "completion": f"A: {2 * i}"} for i in range(12)] + [
  {"messages": c, "id": i} for i, c in enumerate(CONVERSATIONS[:2] * 6)
]


def write_jsonl(path, records):
  """Writes `records` (dicts as JSON, strings as they are) one a line to `path`; returns `path`."""
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return path


# Hugging Face tokenizers and models (tests/unit/test_hf_tokenizer.py); need tokenizers, transformers and torch.

CHATML = (
  "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
  "def add(x, y):\n    return x + y\n",
  "hello world, this is the tokenizer's test.",
  "the quick brown fox",
  "import os\nprint(os.getcwd())",
  "caf\u00e9 na\u00efve \u2014 \u00fcber",
  "<|im_start|>user\nhi<|im_end|>",
]
VOCAB = 320  # trained tokens + specials stay below it; models get this padded vocabulary


def save_tokenizer(folder, style: str = "gpt2"):
  """A byte-level BPE tokenizer trained on TEXTS, saved by transformers with a ChatML chat template.

  style 'gpt2': one '<|endoftext|>' for bos/eos; 'llama': '<s>' / '</s>' and an '<unk>'-free pad.
  Returns the transformers tokenizer."""
  import tokenizers
  import transformers

  backend = tokenizers.Tokenizer(tokenizers.models.BPE())
  backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=VOCAB - 8, special_tokens=SPECIALS, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
  )
  backend.train_from_iterator(TEXTS * 20, trainer)
  special = (
    {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    if style == "gpt2"
    else {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<|endoftext|>"}
  )
  wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special)
  wrapped.chat_template = CHATML
  wrapped.save_pretrained(folder)
  return wrapped


def hf_model(style: str):
  """A random HF model (GPT-2 or LLaMA) of VOCAB ids; a wide init makes greedy choices clear-cut. Its config names
  no EOS, so `generate` stops at one only when asked to."""
  import torch
  import transformers

  torch.manual_seed(0)
  if style == "gpt2":
    config = transformers.GPT2Config(
      vocab_size=VOCAB,
      n_positions=64,
      n_embd=32,
      n_layer=2,
      n_head=4,
      n_inner=64,
      initializer_range=0.3,
      bos_token_id=None,
      eos_token_id=None,
    )
    return transformers.GPT2LMHeadModel(config).eval()
  config = transformers.LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=0.3,
    bos_token_id=None,
    eos_token_id=None,
  )
  return transformers.LlamaForCausalLM(config).eval()


# Sequence classification (tests/unit/test_classify.py, tests/unit/test_init_from.py).

LABELS = ("alpha", "beta", "gamma")
# each class has its own vocabulary, so a few steps can separate them
WORDS = ("apple apricot avocado", "banana blueberry", "cherry coconut cranberry")


def tiny_task(config, tokenizer, split):
  """Three classes; train is balanced, validation has labels [0, 0, 1, 2] (majority of train: 0)."""
  labels = [0, 1, 2] * 8 if split == "train" else [0, 0, 1, 2]
  texts = [f"{WORDS[label]} {i}" for i, label in enumerate(labels)]
  return classify.ClassificationRows(texts, labels, tokenizer or ByteTokenizer(), config.data.seq_len)


def use_tiny_task(monkeypatch):
  """Replaces the stdlib_packages source's labels and rows by LABELS and `tiny_task` (the real one reads the
  whole stdlib) for one test."""
  tiny = dataclasses.replace(sources.get("stdlib_packages"), rows=tiny_task, labels=LABELS)
  monkeypatch.setitem(sources._REGISTRY, "stdlib_packages", tiny)


def classify_config(family):
  """`tiny_config` for the classifier `family` on the stdlib-package labels, with no LM evaluation."""
  c = tiny_config()
  c.model.family, c.model.num_classes, c.data.source = family, len(LABELS), "stdlib_packages"
  if family == "encoder_classifier":
    c.model.norm_position, c.model.num_token_types = "post", 2
  c.eval.max_batches = 0
  return c
