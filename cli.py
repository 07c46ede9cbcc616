"""Launcher so that `python cli.py ...` works from a checkout; the commands live in tinyllm/cli.py."""

from tinyllm.cli import main

if __name__ == "__main__":
    main()
