"""``python -m trainer``: the ``trainer`` command, also as torchrun launches it
(``torchrun --nproc_per_node=N -m trainer fit ...``)."""
from trainer.cli import main

if __name__ == "__main__":
    main(prog_name="trainer")
