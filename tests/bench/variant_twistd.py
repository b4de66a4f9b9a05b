"""
``python -m tests.bench.variant_twistd VARIANT TWISTD_ARGS...``: twistd with
the reactor of one L{tests.bench.layers_server} variant installed first
(quayfront's C{makeService} keeps a reactor that is already installed), so
the whole of quayfront can be measured one reactor change at a time.
"""

from __future__ import annotations

import sys


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit("usage: python -m tests.bench.variant_twistd VARIANT TWISTD_ARGS...")
    from .layers_server import install

    install(sys.argv[1])
    sys.argv = ["twistd", *sys.argv[2:]]
    from twisted.scripts.twistd import run

    run()


if __name__ == "__main__":
    main()
