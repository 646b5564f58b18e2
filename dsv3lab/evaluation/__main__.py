"""``python -m dsv3lab.evaluation ARGS``: lm-eval's command line, with the dsv3lab model registered.

lm-eval 0.4.13 resolves ``--model NAME`` only against its registry and does not look for plugins,
so the registration (an import) has to happen in the same process before its CLI parses the
arguments. Everything after the program name goes to lm-eval unchanged.
"""

from __future__ import annotations


def main() -> None:
    import dsv3lab.evaluation.lm  # noqa: F401  (registers "dsv3lab")
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
