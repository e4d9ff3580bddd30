#!/usr/bin/env python
"""`python tools/status.py ...` = the installed command `lamemo-status ...`;
the code is pretrain/cli/status.py."""
from pretrain.cli.status import main

if __name__ == "__main__":
    raise SystemExit(main())
