"""`python -m jaxllm.compress ...`: the compression command (`jaxllm/compression/__main__.py`) under the
name the docs and scripts use."""

import sys

from jaxllm.compression.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
