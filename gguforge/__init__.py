"""gguforge: Hugging Face checkpoints to GGUF, streaming and torch-free."""

__version__ = "0.1.0"
