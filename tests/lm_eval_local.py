"""Run lm-evaluation-harness through the `llada` model on local tasks (no download) and check
that its results equal the CLI's: a multiple-choice (loglikelihood) task against `llada eval`,
a generate_until task against `llada generate` cut at the stop sequence.

usage: lm_eval_local.py LLADA_BIN MODEL_DIR BASE_URL WORKDIR   (run by tests/serve.rs)"""
import glob
import json
import math
import os
import subprocess
import sys

llada, model_dir, base_url, work = sys.argv[1:5]
os.makedirs(work, exist_ok=True)
here = os.path.dirname(os.path.abspath(__file__))

mc = [
    {"context": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
    {"context": "Two plus two is", "choices": ["four", "five"], "answer": 0},
    {"context": "Cats say", "choices": ["meow", "woof", "moo", "quack"], "answer": 0},
]
gen = [
    {"question": "Q: hello\nA:", "answer": "hi"},
    {"question": "Q: abc\nA:", "answer": "def"},
]
STOP = "s"
mc_path = os.path.join(work, "mc.jsonl")
gen_path = os.path.join(work, "gen.jsonl")
for path, rows in ((mc_path, mc), (gen_path, gen)):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

tasks = os.path.join(work, "tasks")
os.makedirs(tasks, exist_ok=True)


def write_task(name, data, body):
    """A local lm-eval task `name` over the JSON-lines file `data`; `body` is the rest of its
    YAML (output type, prompts, metrics)."""
    with open(os.path.join(tasks, name + ".yaml"), "w") as f:
        f.write(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(data)}
test_split: test
""" + body)


write_task("llada_local_mc", mc_path, """output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: answer
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
""")
write_task("llada_local_gen", gen_path, f"""output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [{json.dumps(STOP)}]
metric_list:
  - metric: exact_match
""")

MC_NUM, BATCH, SEED = 4, 2, 1
out_dir = os.path.join(work, "out")
env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
           PYTHONPATH=os.path.join(here, "..", "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
cmd = [sys.executable, "-m", "llada_lm_eval", "--model", "llada",
       "--model_args", f"base_url={base_url},mc_num={MC_NUM},seed={SEED},gen_length=16,steps=8,block_length=8",
       "--batch_size", str(BATCH), "--tasks", "llada_local_mc,llada_local_gen",
       "--include_path", tasks, "--log_samples", "--output_path", out_dir]
r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
if r.returncode != 0:
    sys.exit(f"lm-eval failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}")


def samples(task):
    files = glob.glob(os.path.join(out_dir, "**", f"samples_{task}_*.jsonl"), recursive=True)
    assert files, f"no samples file for {task} under {out_dir}"
    rows = [json.loads(line) for line in open(sorted(files)[-1])]
    return sorted(rows, key=lambda s: s["doc_id"])


# Multiple choice: lm-eval's per-choice log-likelihoods equal `llada eval`'s.
items = os.path.join(work, "items.jsonl")
e = subprocess.run([llada, "eval", "--model", model_dir, "--tasks", mc_path, "--mc-num", str(MC_NUM),
                    "--batch-size", str(BATCH), "--seed", str(SEED), "--device", "cpu",
                    "--output", items], capture_output=True, text=True)
assert e.returncode == 0, e.stderr
cli = [json.loads(line) for line in open(items)]
got = samples("llada_local_mc")
assert len(got) == len(mc) == len(cli), (len(got), len(cli))
for s, c in zip(got, cli):
    lls = [float(x[0]) for x in s["filtered_resps"]]
    assert all(math.isfinite(x) for x in lls), lls
    assert lls == c["lls"], (s["doc_id"], lls, c["lls"])
    assert s["acc"] == c["acc"], (s, c)

# Generation: lm-eval's answer equals `llada generate`'s text cut at the stop sequence.
got = samples("llada_local_gen")
assert len(got) == len(gen)
for s, item in zip(got, gen):
    g = subprocess.run([llada, "generate", "--model", model_dir, "--prompt", item["question"],
                        "--gen-length", "16", "--steps", "8", "--block-length", "8",
                        "--device", "cpu", "--format", "json"], capture_output=True, text=True)
    assert g.returncode == 0, g.stderr
    want = json.loads(g.stdout)["text"][0].split(STOP)[0]
    resp = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
    assert resp == want, (resp, want)
print("lm-eval: ok")
