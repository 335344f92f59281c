"""Plugins for the fused ops moetrt emits."""
