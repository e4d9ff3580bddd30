#!/usr/bin/env python
"""`python tools/import_official_checkpoint.py ...` = the installed command `lamemo-import-official ...`;
the code is pretrain/cli/import_official_checkpoint.py."""
from pretrain.cli.import_official_checkpoint import main

if __name__ == "__main__":
    raise SystemExit(main())
