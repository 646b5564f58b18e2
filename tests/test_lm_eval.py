"""The lab model through lm-eval's own command line (``--model dsv3lab``), on small local tasks
written here, against a hand computation on the same items with the engine directly.

Three tasks: a multiple-choice task (acc / acc_norm from summed log-likelihoods), a generation
task (exact match of greedy generations cut at the stop strings) and a rolling log-likelihood task
(bits per byte). The hand side uses one unpadded forward per item and a cache-free greedy loop, so
it checks the adapter's batching, right padding, ragged generation and stop handling too.
"""

import glob
import json
import math
import os
import subprocess
import sys

import pytest

from dsv3lab.paths import REPO_ROOT as ROOT

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

LAB = os.path.join(ROOT, "data", "lab-model")

MC = [  # question, choices, gold index (lm-eval puts its target delimiter " " before a choice)
    ("Return the number of items in a", ["string", "banana", "elephant", "violin"], 0),
    ("The keyword used to define a function is", ["def", "lambda", "class", "import"], 0),
    ("A dictionary maps keys to", ["values", "colours", "horses", "songs"], 0),
    ("If the file does not exist, raise", ["FileNotFoundError", "happiness", "a cat"], 0),
    ("The capital of France is", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("Return a list of the", ["elements", "bananas", "planets"], 1),
]
GEN = [  # prompt, target (lm-eval compares the generation, cut at the stop strings, exactly)
    ("Return the number of items in a", " string"),
    ("Return True if the", " same object"),
    ("Raise a ValueError if", " the same object"),
    ("See also the", " exception"),
    ("Return a new", " list"),
    ("The keyword used to define a function is", " def"),
]
UNTIL = ["\n", "."]
MAX_GEN = 12
ROLLING = [
    "Return a new list containing all items from the iterable in ascending order.",
    "The optional argument *key* specifies a function of one argument.",
    "This module provides access to some variables used or maintained by the interpreter.",
]


def _write_tasks(d, gen_items=GEN):
    def jsonl(name, rows):
        p = os.path.join(d, name)
        with open(p, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        return p

    mc = jsonl("mc.jsonl", [dict(question=q, choices=c, answer=a) for q, c, a in MC])
    gen = jsonl("gen.jsonl", [dict(prompt=p, target=t) for p, t in gen_items])
    roll = jsonl("roll.jsonl", [dict(text=t) for t in ROLLING])
    tasks = {
        "lab_mc": f"""task: lab_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
""",
        "lab_gen": f"""task: lab_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: {json.dumps(UNTIL)}
  max_gen_toks: {MAX_GEN}
  do_sample: false
metric_list:
  - metric: exact_match
""",
        "lab_roll": f"""task: lab_roll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {roll}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
""",
    }
    for name, text in tasks.items():
        with open(os.path.join(d, name + ".yaml"), "w", encoding="utf-8") as f:
            f.write(text)


def _greedy(model, tok, prompt):
    """A cache-free greedy generation of at most MAX_GEN tokens, cut at the stop strings."""
    ids, new = list(tok.encode(prompt, add_special_tokens=False).ids), []
    with torch.no_grad():
        for _ in range(MAX_GEN):
            nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if nxt == model.cfg.eos_token_id:
                break
            new.append(nxt)
    text = tok.decode(new, skip_special_tokens=True)
    for s in UNTIL:
        text = text.split(s)[0]
    return text


def _hand(model, tok, gen_items=GEN):
    """The same items scored with the engine directly: one forward per item, no padding."""
    def enc(s):
        return list(tok.encode(s, add_special_tokens=False).ids)

    def ll(context, continuation):
        # lm-eval's split: encode the pair whole, the continuation is what follows the context's tokens
        whole, ctx = enc(context + continuation), enc(context)
        cont = whole[len(ctx):]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0].float(), -1)
        return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))

    acc, acc_norm, mc_lls = [], [], []
    for q, choices, gold in MC:
        lls = [ll(q, " " + c) for c in choices]
        mc_lls.append(lls)
        acc.append(float(max(range(len(lls)), key=lambda i: lls[i]) == gold))
        normed = [v / len(c) for v, c in zip(lls, choices)]   # acc_norm: per character of the choice
        acc_norm.append(float(max(range(len(normed)), key=lambda i: normed[i]) == gold))

    gens = [_greedy(model, tok, prompt) for prompt, _ in gen_items]
    em = [float(g == t) for g, (_, t) in zip(gens, gen_items)]

    total_ll, total_bytes = 0.0, 0
    eos = model.cfg.eos_token_id
    for text in ROLLING:
        ids = [eos] + enc(text)           # add_bos_token=False: the first token is conditioned on EOS
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].float(), -1)
        total_ll += float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
        total_bytes += len(text.encode("utf-8"))
    bpb = -total_ll / total_bytes / math.log(2)
    return dict(acc=acc, acc_norm=acc_norm, mc_lls=mc_lls, gens=gens, em=em, bpb=bpb)


@pytest.mark.skipif(not os.path.exists(os.path.join(LAB, "config.json")), reason="needs data/lab-model")
def test_lm_eval_cli_matches_hand_computation(tmp_path):
    import dsv3lab
    from dsv3lab.tokenizer import load_tokenizer

    tasks_dir, out_dir = tmp_path / "tasks", tmp_path / "out"
    tasks_dir.mkdir()
    # one item whose target is the model's own greedy text, so exact_match cannot be 0 whatever
    # the model (lm-eval still has to generate it token for token); GEN's fixed targets supply misses
    model = dsv3lab.load(LAB, dtype=torch.float32)
    tok = load_tokenizer(LAB)
    gen_items = GEN + [(GEN[0][0] + " list of", _greedy(model, tok, GEN[0][0] + " list of"))]
    _write_tasks(str(tasks_dir), gen_items)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"), HF_HOME=str(tmp_path / "hf_home"),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "dsv3lab.evaluation", "run", "--model", "dsv3lab",
           "--model_args", f"pretrained={LAB},dtype=float32,add_bos_token=False",
           "--device", "cpu", "--batch_size", "4", "--tasks", "lab_mc,lab_gen,lab_roll", "--include_path", str(tasks_dir),
           "--output_path", str(out_dir), "--log_samples"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the hand computation runs while lm-eval does (two cores; the two start-ups dominate)
        hand = _hand(model, tok, gen_items)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-6000:]
    assert "dsv3lab loglikelihood" in stderr and "dsv3lab generate_until" in stderr  # progress shown

    [results_file] = glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True)
    with open(results_file) as f:
        res = json.load(f)["results"]

    def mean(xs):
        return sum(xs) / len(xs)

    assert res["lab_mc"]["acc,none"] == pytest.approx(mean(hand["acc"]), abs=1e-9)
    assert res["lab_mc"]["acc_norm,none"] == pytest.approx(mean(hand["acc_norm"]), abs=1e-9)
    assert res["lab_gen"]["exact_match,none"] == pytest.approx(mean(hand["em"]), abs=1e-9)
    assert res["lab_roll"]["bits_per_byte,none"] == pytest.approx(hand["bpb"], rel=1e-4)
    # the fixture tells right from wrong: some items scored right, some wrong
    assert 0 < mean(hand["em"]) < 1 and 0 < mean(hand["acc"]) < 1

    # per item: lm-eval's log-likelihoods and generations are the hand ones
    def samples(task):
        [p] = glob.glob(str(out_dir / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        with open(p) as f:
            return sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])

    for s, lls in zip(samples("lab_mc"), hand["mc_lls"]):
        got = [float(r[0][0]) for r in s["resps"]]
        assert got == pytest.approx(lls, rel=1e-4, abs=1e-4), (s["doc"]["question"], got, lls)
    for s, g in zip(samples("lab_gen"), hand["gens"]):
        assert s["filtered_resps"][0] == g, (s["doc"]["prompt"], s["filtered_resps"], g)


def test_bad_model_args_are_named():
    from dsv3lab.evaluation.lm import DSV3LabLM
    with pytest.raises(TypeError, match="unknown model_args.*colour"):
        DSV3LabLM(pretrained=LAB, colour="red")
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        DSV3LabLM(pretrained=os.path.join(ROOT, "tests"))
    with pytest.raises(ValueError, match="batch_size"):
        DSV3LabLM(pretrained=LAB, batch_size="many")


def test_registered_with_lm_eval():
    import dsv3lab.evaluation.lm as m
    from lm_eval.api.registry import get_model
    assert get_model("dsv3lab") is m.DSV3LabLM


@pytest.mark.skipif(not os.path.exists(os.path.join(LAB, "config.json")), reason="needs data/lab-model")
def test_chat_template_from_tokenizer_config(tmp_path):
    from dsv3lab.evaluation.lm import DSV3LabLM
    for name in os.listdir(LAB):                    # the lab model plus a tokenizer_config.json
        os.symlink(os.path.join(LAB, name), tmp_path / name)
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "bos_token": {"content": "<｜begin▁of▁sentence｜>"},
         "eos_token": "<｜end▁of▁sentence｜>", "chat_template": template}))
    lm = DSV3LabLM(pretrained=str(tmp_path), dtype="float32")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Sort a list"}]
    text = lm.apply_chat_template(chat)
    assert text == ("<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>Hello<｜end▁of▁sentence｜>"
                    "<｜User｜>Sort a list<｜Assistant｜>")
    ids = lm.tok_encode(text)
    assert ids[0] == lm.cfg.bos_token_id and ids.count(lm.cfg.bos_token_id) == 1   # not doubled
    assert lm.cfg.eos_token_id in ids and lm.add_bos_token
    assert lm.tok_encode("Sort")[0] == lm.cfg.bos_token_id
    lm.tok_config = {}
    with pytest.raises(ValueError, match="no chat_template"):
        lm.apply_chat_template(chat)
