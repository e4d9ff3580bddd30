#!/usr/bin/env python
"""`python tools/download_data.py ...` = the installed command `lamemo-download-data ...`;
the code is pretrain/cli/download_data.py."""
from pretrain.cli.download_data import main

if __name__ == "__main__":
    raise SystemExit(main())
