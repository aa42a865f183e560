"""Invertible networks, one file per network."""

from .irim import NetworkLoop

__all__ = ["NetworkLoop"]
