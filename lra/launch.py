"""`python -m lra.launch`: the training command (`lra.experiments.launch`)."""

if __name__ == "__main__":
    from lra.experiments.launch import console_main

    console_main()
