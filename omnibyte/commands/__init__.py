"""One module per CLI verb (see omnibyte/cli.py)."""
