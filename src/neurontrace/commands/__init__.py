"""CLI command implementations: argument handling and printing; the work is done by the library modules."""
