"""``dsv3lab train-lab``: build the lab's default model from the command line."""

from __future__ import annotations

from dsv3lab.train.lab_model import LAB_RUN, train_lab
from dsv3lab.train.loop import TrainConfig


def add_commands(sub) -> None:
    p = sub.add_parser("train-lab", help="train the lab's default model (CPU, ~10 min) into a directory")
    p.add_argument("--out", default="data/lab-model", help="checkpoint directory (replaced atomically)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="number of steps (reproducible run)")
    g.add_argument("--minutes", type=float, default=None,
                   help="wall-time budget; the step count is fitted to it (default 10 without --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=LAB_RUN["threads"],
                   help="torch threads (1: a shared CPU punishes oversubscribed OpenMP threads)")
    p.add_argument("--batch-size", type=int, default=LAB_RUN["batch_size"])
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--gamma", type=float, default=LAB_RUN["bias_gamma"],
                   help="bias update step (the paper's 0.001 is for ~1e5 steps; a few hundred need more)")
    p.add_argument("--seq-len", type=int, default=TrainConfig.seq_len, help="tokens per training window")
    p.add_argument("--source-code", action="store_true",
                   help="add the standard library's source files to the training text")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="continue training this lab model (weights and tokenizer) instead of from scratch")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train_lab)


def _cmd_train_lab(args) -> int:
    info = train_lab(args.out, steps=args.steps, minutes=args.minutes, seed=args.seed,
                     progress=not args.no_progress, threads=args.threads, lr=args.lr,
                     bias_gamma=args.gamma, batch_size=args.batch_size, seq_len=args.seq_len,
                     source_code=args.source_code, init_from=args.init_from)
    print(f"{args.out}: {info['steps']} steps in {info['wall_s'] / 60:.1f} min; train {info['train_loss']:.3f}, "
          f"val {info['val_loss']:.3f} (FP8 {info['val_loss_fp8']:.3f}, unigram {info['unigram']:.3f}), "
          f"MTP {info['val_mtp_loss']:.3f}; MaxVio {info['maxvio_init']:.2f} -> {info['maxvio_final']:.2f} "
          f"(biases zeroed {info['maxvio_nobias']:.2f}); {info['bytes'] / 1e6:.1f} MB")
    print(f"sample: {info['sample']!r}")
    return 0
