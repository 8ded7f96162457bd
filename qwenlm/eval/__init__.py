"""Evaluation with the reference's protocols: C-Eval, MMLU, CMMLU, GSM8K, HumanEval, tool use, perplexity."""
