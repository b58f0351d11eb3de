"""`python -m lra.report`: compare runs (`lra.experiments.report`)."""

if __name__ == "__main__":
    import sys

    from lra.experiments.report import main

    sys.exit(main())
