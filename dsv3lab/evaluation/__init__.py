"""dsv3lab models inside EleutherAI's lm-evaluation-harness (``lm-eval``).

The harness owns the tasks, prompts, few-shot sampling and metrics; this package only answers its
three requests (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) with the engine's
own batched forward and ``model.generate``. Importing ``dsv3lab.evaluation.lm`` registers the
model under the name ``dsv3lab`` in lm-eval's model registry::

    python -m dsv3lab.evaluation run --model dsv3lab --model_args pretrained=DIR --tasks mmlu

``python -m dsv3lab.evaluation`` (or ``dsv3lab-lm-eval``) is lm-eval's own command line with the
registration done first; lm-eval releases that discover ``lm_eval.models`` entry points find the
model without it (``pyproject.toml`` declares one). See docs/evaluation.md.
"""
