"""Small-scale training for DeepSeek-V3-architecture models, and the lab's default model.

Library apart from scripts (as nanochat keeps them):

  corpus.py     Python's own text -> documents -> split -> tokenizer -> token streams -> windows
  losses.py     next-token and MTP cross-entropy of one window
  loop.py       TrainConfig, the learning-rate schedule, AdamW, ``train`` (one step's order is
                written at its top)
  evaluate.py   validation loss / accuracy / MTP loss / MaxVio on fixed windows; the unigram
                baseline; the MTP draft's agreement and speculative acceptance
  heldout.py    held-out text scored per character (fair across tokenizers)
  fp8_linear.py the three GEMMs of every Linear in BF16 or simulated FP8 (report sec. 3.3)
  log.py        JSONL training logs (atomic) and the training-curve figure
  sample.py     greedy / sampled continuation for the model card
  card.py       the model card
  lab_model.py  the recipe of ``data/lab-model`` (``lab_corpus``, ``train_lab``, ``assess``)
  cli.py        ``dsv3lab train-lab``

The aux-loss-free bias update lives with the other balancing code (``dsv3lab.balance.bias_update``);
the routing recorder, the gates and the balance losses with the probes (``dsv3lab.probes.recorder``,
``.gate``, ``.metrics``); they are re-exported here for the names that used to live in train.py.

    from dsv3lab import train as T
    docs = T.python_docs_corpus()
    train_docs, val_docs = T.split_documents(docs)
    tok = T.train_tokenizer(train_docs, 4096)
    model, log = T.train("lab", T.encode_documents(tok, train_docs), T.encode_documents(tok, val_docs),
                         T.TrainConfig(steps=100, batch_size=4, bias_gamma=0.01))
"""

from dsv3lab.balance.bias_update import bias_update
from dsv3lab.probes.gate import moe_gates
from dsv3lab.probes.metrics import sequence_balance_loss
from dsv3lab.probes.recorder import RoutingRecorder
from dsv3lab.train.card import model_card
from dsv3lab.train.cli import _cmd_train_lab, add_commands
from dsv3lab.train.corpus import (BOS, EOS, encode_documents, eval_windows, python_docs_corpus, reflow,
                                  sample_windows, split_documents, train_tokenizer)
from dsv3lab.train.evaluate import evaluate, unigram_cross_entropy
from dsv3lab.train.lab_model import LAB_RUN, train_lab
from dsv3lab.train.log import jsonl_text, plot_training_log, read_jsonl, write_jsonl
from dsv3lab.train.fp8_linear import gemm_precision, quant_linear
from dsv3lab.train.losses import lm_losses
from dsv3lab.train.loop import TrainConfig, lr_at, train
from dsv3lab.train.sample import greedy_continue

__all__ = ["bias_update", "model_card", "add_commands", "BOS", "EOS", "encode_documents", "eval_windows",
           "python_docs_corpus", "reflow", "sample_windows", "split_documents", "train_tokenizer",
           "evaluate", "unigram_cross_entropy", "LAB_RUN", "train_lab", "jsonl_text", "plot_training_log",
           "read_jsonl", "write_jsonl", "lm_losses", "sequence_balance_loss", "TrainConfig", "lr_at", "train",
           "RoutingRecorder", "moe_gates", "greedy_continue", "gemm_precision", "quant_linear"]
