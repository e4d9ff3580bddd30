#!/usr/bin/env python
"""`python tools/train_tokenizer.py ...` = the installed command `lamemo-train-tokenizer ...`;
the code is pretrain/cli/train_tokenizer.py."""
from pretrain.cli.train_tokenizer import main

if __name__ == "__main__":
    raise SystemExit(main())
