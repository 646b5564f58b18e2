import json
import os
import subprocess
import sys

import pytest
import torch

import dsv3lab
from dsv3lab.generate import _sample


@pytest.fixture(scope="module")
def tiny():
    return dsv3lab.build("tiny", seed=0)


def greedy_ref(model, prompt, n):
    """No cache: re-run the whole sequence every step and take the argmax."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_matches_uncached_reference(tiny):
    p = [5, 17, 99, 3, 250]
    out = tiny.generate([p], max_new_tokens=12, stop_tokens=[])
    assert out[0] == greedy_ref(tiny, p, 12)


@pytest.mark.parametrize("mode", ["absorbed", "naive"])
def test_ragged_batch_equals_each_prompt_alone(tiny, mode):
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13], [400, 401, 402, 403, 404]]
    batch = tiny.generate(prompts, max_new_tokens=8, stop_tokens=[], cache_mode=mode)
    for p, b in zip(prompts, batch):
        assert b == tiny.generate([p], max_new_tokens=8, stop_tokens=[], cache_mode=mode)[0]
    tiny.set_attn_mode("absorbed")


def test_stop_tokens_cut_output(tiny):
    p = [5, 17, 99]
    full = tiny.generate([p], max_new_tokens=10, stop_tokens=[])[0]
    stop = full[4]
    cut = tiny.generate([p], max_new_tokens=10, stop_tokens=[stop])[0]
    assert cut == full[:full.index(stop)]


def test_sampling_is_seeded_and_top_p_limits_support():
    g = torch.Generator()
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    draws = [int(_sample(logits, 1.0, 1.0, g.manual_seed(s))) for s in range(400)]
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / 400
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.06, rtol=0)
    # top-p 0.7: the two most likely tokens carry 0.86 of the mass, the first alone 0.61
    draws = {int(_sample(logits, 1.0, 0.7, g.manual_seed(s))) for s in range(300)}
    assert draws == {0, 1}
    assert {int(_sample(logits, 1.0, 0.01, g.manual_seed(s))) for s in range(50)} == {0}


def test_sampled_generation_reproducible(tiny):
    a = tiny.generate([[1, 2, 3]], max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7, stop_tokens=[])
    b = tiny.generate([[1, 2, 3]], max_new_tokens=10, temperature=0.8, top_p=0.9, seed=7, stop_tokens=[])
    c = tiny.generate([[1, 2, 3]], max_new_tokens=10, temperature=0.8, top_p=0.9, seed=8, stop_tokens=[])
    assert a == b and a != c


def test_generate_bad_input(tiny):
    with pytest.raises(ValueError, match="longer than the model's context"):
        tiny.generate([[1] * (tiny.cfg.max_position_embeddings + 1)], max_new_tokens=1)
    with pytest.raises(ValueError, match="token id 9999 outside the vocabulary"):
        tiny.generate([[1, 9999]], max_new_tokens=1)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tiny.generate([[1], []], max_new_tokens=1)
    with pytest.raises(ValueError, match="top_p"):
        tiny.generate([[1]], max_new_tokens=1, top_p=0)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "dsv3lab", *args], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli_generate_with_ids_and_tokenizer(tmp_path, tiny):
    d = dsv3lab.save(tiny, tmp_path / "ck")
    r = run_cli("generate", d, "--prompt-ids", "5,17,99,3,250", "--max-new-tokens", "6", "--stop", "")
    assert r.returncode == 0, r.stderr
    ids = [int(t) for t in r.stdout.split("ids:")[1].strip().split(",")]
    assert ids == greedy_ref(tiny, [5, 17, 99, 3, 250], 6)
    r = run_cli("generate", d, "--prompt", "hello")
    assert r.returncode == 2 and "no tokenizer.json" in r.stderr
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "ck" / "tokenizer.json"))
    r = run_cli("generate", d, "--prompt", "the quick", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the quick")


def test_cli_info_json_671b():
    r = run_cli("info", "v3-671b", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["total_params"] == 671_026_404_352 and s["activated_params"] == 37_552_282_624
    assert s["mtp_params"] == 11_610_068_224 and s["kv_cache_bytes_per_token"] == 70_272
    assert s["kv_cache_bytes_per_token_with_mtp"] == 62 * 576 * 2                # 61 layers + the MTP layer
    r = run_cli("info", "tiny")
    assert "240  bytes (bf16 latent, absorbed MLA; 320 with the MTP layers')" in r.stdout    # 3 (+1) x 80 B
    r = run_cli("info", "no-such-model")
    assert r.returncode == 2 and "neither a preset" in r.stderr


@pytest.mark.parametrize("seed", [0, 1])
def test_mtp_speculative_equals_greedy(seed):
    from dsv3lab.generate import generate_speculative
    m = dsv3lab.build("tiny", seed=seed)
    p = [3, 1, 4, 1, 5, 9, 2, 6]
    ref = m.generate([p], max_new_tokens=20, stop_tokens=[])[0]
    out, st = generate_speculative(m, p, max_new_tokens=20, stop_tokens=[], return_stats=True)
    assert out == ref                          # the random MTP head is mostly rejected
    # an oracle draft that is right on 2 of every 3 calls exercises the accept path too
    seq = p + ref + [0, 0]
    real, calls = m.mtp_logits, []

    def oracle(h, tokens, start=0, cache=None, depth=None):
        (lg,) = real(h, tokens, start=start, cache=cache, depth=depth)
        calls.append(1)
        target = seq[start + tokens.shape[1] - 1 + 2]
        if len(calls) % 3:
            lg[:, -1] = -1e9
            lg[:, -1, target] = 1e9
        return [lg]

    m.mtp_logits = oracle
    out, st = generate_speculative(m, p, max_new_tokens=20, stop_tokens=[], return_stats=True)
    assert out == ref
    assert 0 < st["accepted"] < st["steps"] < 19 and st["tokens_per_step"] > 1.2


def test_speculative_needs_mtp():
    from dsv3lab.generate import generate_speculative
    m = dsv3lab.build(dsv3lab.ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="MTP"):
        generate_speculative(m, [1, 2], 4)


def test_generate_speculative_flag(tiny):
    prompts = [[1, 2, 3], [9, 8]]
    assert tiny.generate(prompts, max_new_tokens=6, stop_tokens=[], speculative=True) == \
        tiny.generate(prompts, max_new_tokens=6, stop_tokens=[])
