"""uniap: PyTorch-native automatic parallelism (UniAP, solved exactly)."""

__version__ = "0.1.0"
