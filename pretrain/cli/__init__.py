"""The command-line tools, installed as console commands by ``pip install -e .`` (``[project.scripts]`` in
pyproject.toml): ``lamemo-export``, ``lamemo-evaluate``, ``lamemo-generate``, ``lamemo-preprocess``,
``lamemo-train-tokenizer``, ``lamemo-download-data``, ``lamemo-verify-data``, ``lamemo-import-official``,
``lamemo-plot-runs``, ``lamemo-attention-utilization``, ``lamemo-status``. Each module's ``main(argv)`` returns the exit status;
``tools/<module>.py`` runs the same ``main``.
"""
