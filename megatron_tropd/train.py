"""`python -m megatron_tropd.train` (under torchrun): the trainer's entry point. See training.py."""

from megatron_tropd.training import main

if __name__ == "__main__":
    main()
