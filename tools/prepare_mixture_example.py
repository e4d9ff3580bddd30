#!/usr/bin/env python
"""`python tools/prepare_mixture_example.py ...` = the installed command `lamemo-prepare-mixture-example ...`;
the code is pretrain/cli/prepare_mixture_example.py."""
from pretrain.cli.prepare_mixture_example import main

if __name__ == "__main__":
    raise SystemExit(main())
