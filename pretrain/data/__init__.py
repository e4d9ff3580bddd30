"""Data for LaMemo pretraining: tokenizers, memory-mapped token files, the segment-recurrent loader.

Modules (import them directly; this package imports nothing heavy on its own):

* :mod:`pretrain.data.tokenizer` -- ``Tokenizer``, ``load_tokenizer``, ``train_tokenizer``,
  ``check_vocab_matches`` (sentencepiece BPE / unigram, byte-level, word-level).
* :mod:`pretrain.data.indexed` -- ``preprocess`` (text -> ``.bin`` / ``.idx`` / ``.meta.json``) and
  ``load_tokens`` (-> 1-D ``numpy.memmap``).
* :mod:`pretrain.data.streams` -- ``SegmentStreams`` (training, exact resume from one offset).
* :mod:`pretrain.data.sources` -- ``data.train`` / ``data.valid`` as lists of weighted sources: parsing,
  shards and globs, loading, the resume check of the sources.
* :mod:`pretrain.data.mixture` -- ``MixtureStreams`` (a weighted mixture read in contiguous spans) and the
  trainer's ``build_streams`` / ``data_metrics``.
* :mod:`pretrain.data.demo_corpus` -- the offline demo corpus (the standard library's own sources).
* :mod:`pretrain.data.errors` -- ``DataError``, raised for every bad-input case.
"""
