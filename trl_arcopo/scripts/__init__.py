"""Command-line scripts of `trl-arcopo`: each module exposes `make_parser()` and `main(argv=None)`."""
