"""Command-line interface: ``asymml train | eval | bench | privacy | validate``."""
