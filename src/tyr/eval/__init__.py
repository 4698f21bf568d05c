"""Evaluation: held-out perplexity and zero-shot accuracy (with an lm-eval adapter)."""

from __future__ import annotations

from tyr.eval.ppl import (
    LOGIT_ELEMENTS,
    cached_ppl,
    nll_sum,
    perplexity,
)
from tyr.eval.zeroshot import (
    SCHEMA,
    evaluate,
    lm_eval_harness,
    open_for_eval,
    score_doc,
)

__all__ = [
    "LOGIT_ELEMENTS",
    "nll_sum",
    "perplexity",
    "cached_ppl",
    "SCHEMA",
    "evaluate",
    "score_doc",
    "open_for_eval",
    "lm_eval_harness",
]
