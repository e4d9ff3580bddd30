#!/usr/bin/env python
"""`python tools/verify_data.py ...` = the installed command `lamemo-verify-data ...`;
the code is pretrain/cli/verify_data.py."""
from pretrain.cli.verify_data import main

if __name__ == "__main__":
    raise SystemExit(main())
