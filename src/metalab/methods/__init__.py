"""The methods, one file per paper. ``METHODS`` maps the CLI name to the class.

Adding a method is one file in this folder and one line in ``_REGISTRY`` (docs/ADDING-A-METHOD.md).
"""

from __future__ import annotations

from importlib import import_module

from metalab.errors import ConfigError
from metalab.methods.base import Method

_REGISTRY = (  # "module:Class" under metalab.methods, one line per method
    "protonet:ProtoNet",
    "maml:MAML",
    "maml:FOMAML",
    "matching:MatchingNetworks",
    "gnn:GNN",
    "protonet_zero:ProtoNetZero",
    "siamese:Siamese",
    "meta_lstm:MetaLSTM",
    "l2o:L2O",
    "mann:MANN",
    "llama:LLAMA",
    "platipus:PLATIPUS",
    "arml:ARML",
    "mr_maml:MRMAML",
    "cnp:CNP",
    "acai:ACAI",
    "bigan:BiGAN",
    "simclr:SimCLR",
)


def _load(entry: str) -> type[Method]:
    module, name = entry.split(":")
    return getattr(import_module(f"metalab.methods.{module}"), name)


METHODS: dict[str, type[Method]] = {cls.name: cls for cls in map(_load, _REGISTRY)}


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: use one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
