#!/usr/bin/env python
"""`python tools/generate.py ...` = the installed command `lamemo-generate ...`;
the code is pretrain/cli/generate.py."""
from pretrain.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
