#!/usr/bin/env python
"""`python tools/preprocess_data.py ...` = the installed command `lamemo-preprocess ...`;
the code is pretrain/cli/preprocess_data.py."""
from pretrain.cli.preprocess_data import main

if __name__ == "__main__":
    raise SystemExit(main())
