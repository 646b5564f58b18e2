"""The lab model's card (``data/lab-model/README.md``), written from the numbers of its run."""

from __future__ import annotations


def model_card(info: dict) -> str:
    i = info
    lines = [
        "# dsv3lab lab model",
        "",
        f"A {i['params_m']:.1f}M-parameter DeepSeek-V3-architecture model (preset `{i['preset']}`: "
        f"{i['layers']} layers, hidden {i['hidden']}, MLA with q/kv low rank, {i['experts']} routed "
        f"experts of width {i['expert_width']} in {i['groups']} groups, top-{i['top_k']}, 1 shared expert, "
        "sigmoid gate with aux-loss-free bias, MTP depth 1, YaRN), trained "
        + (f"on from the model in `{i['init_from']}` (its weights and tokenizer)" if i.get("init_from")
           else "from scratch") + " on CPU by "
        "`dsv3lab train-lab`. It is a fixture for the lab's notebooks and tests, not a useful language "
        "model: it writes Python-documentation-flavoured English.",
        "",
        "## Data",
        f"- Python {i['python']}'s own text: the reference manual (`pydoc_data.topics`, {i['n_topics']} topics) "
        f"and standard-library docstrings of at least 200 characters"
        + (f", plus the source of {i['n_source_files']} standard-library modules (each cut at 24,000 "
           "characters; the modules of validation docstrings held out)" if i.get("n_source_files") else "")
        + f"; {i['n_docs']} documents, {i['chars'] / 1e6:.2f} M characters.",
        f"- Split by whole document (seed {i['seed']}): {i['train_tokens']:,} training tokens, "
        f"{i['val_tokens']:,} validation tokens.",
        f"- Tokenizer: byte-level BPE (`tokenizers`), vocabulary {i['vocab']}, "
        f"{i['chars_per_token']:.2f} characters per token; BOS = 0, EOS = 1 (DeepSeek-V3 spellings).",
        "",
        "## Training",
        f"- {i['steps']} steps of {i['batch_size']} x {i['seq_len']} tokens "
        f"({i['tokens_seen'] / 1e6:.2f} M tokens, {i['epochs']:.2f} epochs) in "
        f"{i['wall_s'] / 60:.1f} min on {i['threads']} CPU thread(s) ({i['tok_s']:.0f} tokens/s, on a "
        "machine shared with other jobs)" + (f"; stopped by the time limit in a {i['schedule_steps']}-step "
        "schedule." if i['schedule_steps'] != i['steps'] else "."),
        f"- AdamW (0.9, 0.95), weight decay 0.1, peak LR {i['lr']:g} with {i['warmup']} warm-up steps "
        f"and cosine decay to {i['lr'] * i['min_lr_ratio']:g}, grad clip 1.0.",
        f"- Loss: next-token CE + MTP loss with lambda = {i['mtp_lambda']} (depth 1).",
        f"- Aux-loss-free balancing: gamma = {i['gamma']} per step (the paper's 0.001 is meant for "
        "~1e5 steps; routing here collapses within a few steps and a few hundred steps must undo "
        "it), paper's uncentred form, no auxiliary loss.",
        "",
        "## Results",
        "",
        "| | value |",
        "|---|---|",
        f"| final train loss (mean of last 20 steps) | {i['train_loss']:.3f} |",
        f"| validation loss (fp32 weights) | {i['val_loss']:.4f} |",
        f"| validation loss (this FP8 checkpoint) | {i['val_loss_fp8']:.4f} |",
        f"| validation MTP loss (token i+2) | {i['val_mtp_loss']:.3f} |",
        f"| unigram cross-entropy on validation | {i['unigram']:.3f} |",
        f"| validation MaxVio at initialisation | {i['maxvio_init']:.2f} |",
        f"| validation MaxVio after training | {i['maxvio_final']:.2f} |",
        f"| ... same weights with the biases zeroed | {i['maxvio_nobias']:.2f} |",
    ] + [
        f"| held-out {'prose' if k == 'val' else 'code'}: nats per character (unigram) | "
        f"{v['nats_per_char']:.4f} ({v['unigram_nats_per_char']:.4f}) |"
        for k, v in i.get("heldout", {}).items()
    ] + ([
        f"| MTP draft: teacher-forced agreement / speculative acceptance / tokens per step | "
        f"{i['mtp_agreement']:.3f} / {i['mtp_acceptance']:.3f} / {i['mtp_tokens_per_step']:.2f} |"
    ] if "mtp_acceptance" in i else []) + [
        "",
        "Losses are nats per token; MaxVio = (max load - mean load) / mean load, mean over the "
        f"{i['moe_layers']} MoE layers (MTP's included).",
        "",
        f"Continuations of `{i['prompt']}`, greedy and sampled (temperature 0.8, seed 0):",
        "",
        "```",
        i["sample"],
        "```",
        "",
        "```",
        i["sample_t"],
        "```",
        "",
        "![training curve](training_curve.png)",
        "",
        "## Files",
        "- `config.json`, `model.safetensors.index.json`, `model-*.safetensors`: official HF layout, "
        "FP8 e4m3 weights with 128x128 `weight_scale_inv` (load with `dsv3lab.load`).",
        "- `tokenizer.json`: `tokenizers.Tokenizer.from_file`.",
        "- `training_log.jsonl`: one line per step.",
        "",
        f"Retrain: `{i['command']}`",
        "",
    ]
    return "\n".join(lines)
