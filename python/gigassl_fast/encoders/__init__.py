"""Tile encoders: plain-torch models with our own weight loading, in one registry."""

from . import efficientnet_lite, foundation, resnet  # noqa: F401 - importing registers the encoders
from .registry import EncoderConfig, create_encoder, get_config, list_encoders, register_encoder

__all__ = ["EncoderConfig", "create_encoder", "get_config", "list_encoders", "register_encoder"]
