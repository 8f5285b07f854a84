"""chatbot: a self-hosted, fully async chatbot backend."""

__version__ = "0.1.0"
