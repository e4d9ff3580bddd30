#!/usr/bin/env python
"""`python tools/checkpoint.py info PATH` = the installed command `lamemo-checkpoint info PATH`;
the code is pretrain/cli/checkpoint.py."""
from pretrain.cli.checkpoint import main

if __name__ == "__main__":
    raise SystemExit(main())
