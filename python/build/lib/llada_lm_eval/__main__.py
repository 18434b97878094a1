"""``python -m llada_lm_eval ARGS``: lm-eval's own command line with the ``llada`` model
registered (as upstream's ``eval_llada.py`` runs the harness)."""

import llada_lm_eval  # noqa: F401  (registers the model)
from lm_eval.__main__ import cli_evaluate

if __name__ == "__main__":
    cli_evaluate()
