#!/usr/bin/env python
"""`python tools/export_checkpoint.py ...` = the installed command `lamemo-export ...`;
the code is pretrain/cli/export_checkpoint.py."""
from pretrain.cli.export_checkpoint import main

if __name__ == "__main__":
    raise SystemExit(main())
