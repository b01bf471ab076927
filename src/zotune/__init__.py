"""zotune: forward-only (MeZO) fine-tuning of RoBERTa-family masked language models."""

__version__ = "0.1.0"
