#!/usr/bin/env python
"""`python tools/attention_utilization.py ...` = the installed command `lamemo-attention-utilization ...`;
the code is pretrain/cli/attention_utilization.py."""
from pretrain.cli.attention_utilization import main

if __name__ == "__main__":
    raise SystemExit(main())
