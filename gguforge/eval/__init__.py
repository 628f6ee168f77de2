"""`gguforge eval`: quality of GGUF files against their base model, with llama-perplexity's statistics.

torch, transformers and llama_cpp are imported inside functions only."""

from .run import EvalOptions, EvalResult, evaluate

__all__ = ["EvalOptions", "EvalResult", "evaluate"]
