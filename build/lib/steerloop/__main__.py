"""``python -m steerloop``: the same command line as the ``steerloop`` console script."""

from steerloop.evaluation.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
