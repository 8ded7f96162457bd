"""User-facing apps over the Python API: the terminal chat (and, later, the web page)."""
