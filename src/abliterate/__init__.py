"""abliterate: find, remove (or strengthen) and measure the refusal direction of a chat model."""

__version__ = "0.1.0"
