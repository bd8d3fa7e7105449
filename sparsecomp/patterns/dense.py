"""Dense: every key of the site's own structure (causal, window, padding)."""

from .base import Pattern, register

DENSE = register(Pattern("dense", params={}, accepts={}, doc="every key the site's mask keeps"))
