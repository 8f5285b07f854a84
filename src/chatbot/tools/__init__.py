"""Tools the model may call, and the sets they come in."""
