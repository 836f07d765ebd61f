"""Command line, servers and the composition root."""
