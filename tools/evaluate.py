#!/usr/bin/env python
"""`python tools/evaluate.py ...` = the installed command `lamemo-evaluate ...`;
the code is pretrain/cli/evaluate.py."""
from pretrain.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
