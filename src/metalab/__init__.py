"""metalab: classic meta-learning systems under one API."""

__version__ = "0.1.0"
