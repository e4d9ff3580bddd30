"""Data for LaMemo pretraining: tokenizers, memory-mapped token files, the segment-recurrent loader.

Modules (import them directly; this package imports nothing heavy on its own):

* :mod:`pretrain.data.tokenizer` -- ``Tokenizer``, ``load_tokenizer``, ``train_tokenizer``,
  ``check_vocab_matches`` (sentencepiece BPE / unigram, byte-level, word-level).
* :mod:`pretrain.data.indexed` -- ``preprocess`` (text -> ``.bin`` / ``.idx`` / ``.meta.json``) and
  ``load_tokens`` (-> 1-D ``numpy.memmap``).
* :mod:`pretrain.data.streams` -- ``SegmentStreams`` (training, exact resume from one offset).
* :mod:`pretrain.data.demo_corpus` -- the offline demo corpus (the standard library's own sources).
* :mod:`pretrain.data.errors` -- ``DataError``, raised for every bad-input case.
"""
