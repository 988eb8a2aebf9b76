"""Model and training loop that stream the shards written by :mod:`pipeline` (see DESIGN §2)."""

from trainer.optimizers import keep_bitsandbytes_out

# Before any trainer module imports peft, which would import bitsandbytes (see the function).
keep_bitsandbytes_out()
