"""``dsv3lab trace`` end to end on the tiny preset (issue 4)."""

import json

import torch

from dsv3lab.cli import main
from dsv3lab.probes import formats


def test_trace_cli_formats(tmp_path, capsys):
    out = str(tmp_path / "t.safetensors")
    assert main(["trace", "tiny", "--text", "hello", "--text", "world", "--max-new-tokens", "2",
                 "--out", out]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rec = formats.load_trace(out)
    assert info["tokens"] == rec["tensors"]["topk_ids"].shape[1] == 2 * 5 + 2
    assert rec["tensors"]["token_ids"][:5].tolist() == list(b"hello")
    sg = str(tmp_path / "t.pt")
    assert main(["trace", "tiny", "--prompt-ids", "1,2,3", "--format", "sglang", "--out", sg]) == 0
    back = formats.from_sglang(sg)
    assert back["tensors"]["token_ids"].tolist() == [1, 2, 3]
    mg = str(tmp_path / "t.jsonl")
    assert main(["trace", "tiny", "--prompt-ids", "1,2,3", "--format", "megatron", "--out", mg]) == 0
    assert torch.equal(formats.from_megatron(mg)["tensors"]["topk_ids"], back["tensors"]["topk_ids"])
    assert main(["trace", "tiny", "--out", out]) == 2          # no prompt: clean error
