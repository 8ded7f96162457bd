"""Decoding: turning a model and a prompt into new tokens."""

from .greedy import greedy_generate, greedy_steps

__all__ = ["greedy_generate", "greedy_steps"]
