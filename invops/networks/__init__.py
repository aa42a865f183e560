"""Invertible networks, one file per network."""

__all__: list[str] = []
