"""`python -m lra.data prepare ...`: prepare a task's data (`lra.training.data`)."""

if __name__ == "__main__":
    import sys

    from lra.training.data import command_main

    sys.exit(command_main(sys.argv[1:]))
