"""The methods, one file per paper. ``METHODS`` maps the CLI name to the class."""

from __future__ import annotations

from metalab.errors import ConfigError
from metalab.methods.base import Method
from metalab.methods.gnn import GNN
from metalab.methods.l2o import L2O
from metalab.methods.maml import FOMAML, MAML
from metalab.methods.mann import MANN
from metalab.methods.matching import MatchingNetworks
from metalab.methods.meta_lstm import MetaLSTM
from metalab.methods.protonet import ProtoNet
from metalab.methods.protonet_zero import ProtoNetZero
from metalab.methods.siamese import Siamese

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        ProtoNet,
        MAML,
        FOMAML,
        MatchingNetworks,
        GNN,
        ProtoNetZero,
        Siamese,
        MetaLSTM,
        L2O,
        MANN,
    )
}


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: use one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
