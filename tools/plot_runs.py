#!/usr/bin/env python
"""`python tools/plot_runs.py ...` = the installed command `lamemo-plot-runs ...`;
the code is pretrain/cli/plot_runs.py."""
from pretrain.cli.plot_runs import main

if __name__ == "__main__":
    raise SystemExit(main())
