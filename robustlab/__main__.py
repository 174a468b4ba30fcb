"""`python -m robustlab`: the same command line as the `robustlab` script."""

from robustlab.cli import entry

if __name__ == "__main__":
    entry()
