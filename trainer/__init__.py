"""Model and training loop that stream the shards written by :mod:`pipeline` (see DESIGN §2)."""

import logging

# bitsandbytes (the optional 8-bit optimizer; peft imports it whenever it is installed) warns at
# import, on CPUs with AVX-512 bf16, that it could not fetch a 4-bit CPU GEMM kernel from the
# Hugging Face hub. svp runs no 4-bit GEMM, and a line about a missing kernel in every command's
# output would read as a fault: that one message is dropped, every other bitsandbytes message kept.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "gemm_4bit" not in record.getMessage())
