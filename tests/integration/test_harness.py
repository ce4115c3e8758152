"""jaxlm as an lm-evaluation-harness model (`jaxlm eval --tasks`, `jaxlm.tasks.harness`), on tasks made from files
this test writes: nothing downloads (HF_DATASETS_OFFLINE=1). The harness's log-likelihoods are jaxlm's own scores."""

import json
import sys

import numpy as np
import pytest
from support import error_line, run_in_process

pytest.importorskip("lm_eval")

import jaxlm
from jaxlm.inference import score as score_lib
from jaxlm.tasks import harness

QUESTIONS = [
  {"question": "def f(x):\n    return", "choices": [" x", " ][", " 0"], "answer": 0},
  {"question": "import", "choices": [" os", " )("], "answer": 0},
  {"question": "class A:\n   ", "choices": [" pass", " ==="], "answer": 0},
]
TEXTS = [{"text": "def main():\n    return 0\n"}, {"text": "x = [1, 2, 3]\n" * 30}]  # the second: past max_len
PROMPTS = [{"prompt": "def f(", "target": "x"}, {"prompt": "import ", "target": "os"}]


def task_yaml(name: str, data, cache, body: str) -> str:
  return (
    f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {cache}\n"
    f"test_split: test\n{body}"
  )


@pytest.fixture
def tasks(tmp_path, monkeypatch):
  """Three tasks, one per request kind: multiple choice (loglikelihood), perplexity (loglikelihood_rolling) and
  generation (generate_until)."""
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  folder, cache = tmp_path / "tasks", tmp_path / "cache"
  folder.mkdir()
  bodies = {
    "jaxlm_mc": (
      QUESTIONS,
      "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: answer\n"
      "target_delimiter: ''\nmetric_list:\n  - metric: acc\n",
    ),
    "jaxlm_ppl": (
      TEXTS,
      "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
      "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n",
    ),
    "jaxlm_gen": (
      PROMPTS,
      "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
      "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\nmetric_list:\n  - metric: exact_match\n",
    ),
  }
  for name, (rows, body) in bodies.items():
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{name}.yaml").write_text(task_yaml(name, data, cache, body))
  return folder


def test_harness_loglikelihoods_are_jaxlms_own_scores(cli_run, tasks):
  run = jaxlm.load(cli_run[0])
  results = harness.evaluate(run, ["jaxlm_mc", "jaxlm_ppl", "jaxlm_gen"], str(tasks), batch_size=4, log_samples=True)
  samples = results["samples"]
  for sample in samples["jaxlm_mc"]:
    question = QUESTIONS[sample["doc_id"]]
    ours = score_lib.loglikelihood(run, [(question["question"], choice) for choice in question["choices"]])
    harness_scores = [response[0] for response in sample["resps"]]
    np.testing.assert_allclose([lp for lp, _ in harness_scores], [lp for lp, _ in ours], rtol=1e-5)
    assert [greedy for _, greedy in harness_scores] == [greedy for _, greedy in ours]
  rolling = {s["doc_id"]: s["resps"][0][0] for s in samples["jaxlm_ppl"]}
  scored = run.score([t["text"] for t in TEXTS])
  assert scored[1].num_tokens > run.config.model.max_len  # scored whole, in windows
  np.testing.assert_allclose([rolling[0], rolling[1]], [float(s.logprobs.sum()) for s in scored], rtol=1e-5)
  # bits per byte from the harness's own sums: -sum(log P) / ln 2 / bytes, over both texts.
  num_bytes = sum(len(t["text"].encode()) for t in TEXTS)
  expected_bpb = -sum(rolling.values()) / np.log(2) / num_bytes
  assert results["results"]["jaxlm_ppl"]["bits_per_byte,none"] == pytest.approx(expected_bpb, rel=1e-5)
  generated = [s["resps"][0][0] for s in samples["jaxlm_gen"]]
  assert generated == harness.generate_until(
    run, [(p["prompt"], {"until": ["\n"], "max_gen_toks": 6}) for p in PROMPTS]
  )
  assert all("\n" not in text and len(text.encode()) <= 6 for text in generated)
  assert 0.0 <= results["results"]["jaxlm_mc"]["acc,none"] <= 1.0


def test_jaxlm_eval_tasks_prints_the_table_and_writes_the_results(cli_run, tasks, tmp_path, capfd):
  result = run_in_process(
    ["eval", "--workdir", str(cli_run[0]), "--tasks", "jaxlm_mc", "--include-path", str(tasks), "--limit", "2"], capfd
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "jaxlm_mc" in result.stdout and "acc" in result.stdout and "|" in result.stdout  # the harness's table
  written = json.loads((cli_run[0] / "harness_step_6.json").read_text())
  assert written["step"] == 6 and 0.0 <= written["jaxlm_mc"]["acc,none"] <= 1.0

  unknown = run_in_process(
    ["eval", "--workdir", str(cli_run[0]), "--tasks", "nope", "--include-path", str(tasks)], capfd
  )
  assert unknown.returncode == 2 and "task 'nope' not found in --include-path" in error_line(unknown)


def test_a_missing_harness_is_one_line_naming_the_extra(cli_run, monkeypatch, capfd):
  monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
  result = run_in_process(["eval", "--workdir", str(cli_run[0]), "--tasks", "anything"], capfd)
  assert result.returncode == 2
  assert "pip install 'jaxlm[eval]'" in error_line(result)
