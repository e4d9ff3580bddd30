"""Tokenizers behind one interface: sentencepiece BPE / unigram, byte-level, word-level.

Three properties hold for every tokenizer here; the preprocessing and the tests rely on them:

* **Line independence.** ``encode(a + "\\n" + b) == encode(a + "\\n") + encode(b)``: text is encoded
  one line at a time, so a corpus can be tokenized in newline-aligned chunks by several processes and
  give exactly the tokens of the whole file.
* **One end-of-document id.** ``eos_id`` is the id of ``<eos>``. ``encode_document(text)`` returns
  the ids of one document ending in ``<eos>``; the token files are documents concatenated this way.
* **Saved as a directory.** ``save(dir)`` writes ``lamemo_tokenizer.json`` (kind, sizes, options) plus the
  model files; ``load_tokenizer(dir)`` reads it back (directories written before it had that name, with
  ``tokenizer.json``, still load; that name is transformers' file, see ``hf_tokenizer``). Runs, checkpoints and exports copy this directory
  so a model never travels without the tokenizer it was trained with.

The kinds:

``bpe`` / ``unigram`` (:class:`SentencePieceTokenizer`)
    Trained with ``sentencepiece.SentencePieceTrainer`` with identity normalization, no dummy prefix
    and ``"\\n"`` as a user-defined piece, so ``decode(encode(text)) == text`` exactly when byte
    fallback is on (the default). ``<eos>`` is a control symbol: the literal text ``<eos>`` is not
    turned into the end-of-document id.
``byte`` (:class:`ByteTokenizer`)
    The 256 byte values plus ``<eos>`` = 256 (enwik8 / text8-style character models). It reads raw
    bytes, so non-UTF-8 input such as enwik8's split points is fine.
``word`` (:class:`WordTokenizer`)
    Whitespace-split words with ``<eos>`` at the end of every line, the vocabulary built from the
    training split only and ordered by frequency (``<eos>`` first), as in Transformer-XL's WikiText
    handling (frequency order is what adaptive-softmax cutoffs assume). Here ``<eos>`` *is* the newline:
    ``decode`` turns it back into ``"\\n"``. WikiText already contains ``<unk>``; an unknown word maps
    to ``<unk>`` when the vocabulary has it and is an error otherwise.
"""

from __future__ import annotations

import abc
import hashlib
import inspect
import io
import itertools
import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from pretrain.data.errors import DataError
from pretrain.data.textio import PathLike, decode_utf8, expand_inputs, iter_lines
from pretrain.progress import progress

TOKENIZER_FILE = "lamemo_tokenizer.json"
#: Where the description lived before: transformers' file name, so it is read only when it is ours.
LEGACY_TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
EOS = "<eos>"
UNK = "<unk>"
KINDS = ("bpe", "unigram", "byte", "word")


def split_lines_keepends(text: str) -> list[str]:
    """Split on ``"\\n"`` only (not on the other separators ``str.splitlines`` knows), keeping it."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


class Tokenizer(abc.ABC):
    """The interface the trainer, the preprocessing and the tools use.

    Attributes:
        kind: ``"bpe"``, ``"unigram"``, ``"byte"`` or ``"word"``.
        vocab_size: number of ids; every id is in ``[0, vocab_size)``.
        eos_id: id of ``<eos>``, which ends every document in a token file.
    """

    kind: str
    vocab_size: int
    eos_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, line by line; no end-of-document ``<eos>`` is added (except that the word
        tokenizer ends every line with ``<eos>``, its newline)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; the inverse of :meth:`encode` (exact for bpe/unigram with byte fallback and
        for byte; whitespace-normalized for word)."""

    def encode_document(self, text: str) -> list[int]:
        """Ids of one document: :meth:`encode` plus a final ``<eos>``."""
        ids = self.encode(text)
        ids.append(self.eos_id)
        return ids

    def encode_bytes(self, data: bytes, source: str = "<bytes>", offset: int = 0) -> list[int]:
        """:meth:`encode` of UTF-8 ``data``; undecodable bytes raise :class:`DataError` naming
        ``source`` and the byte ``offset`` (the byte tokenizer accepts any bytes)."""
        return self.encode(decode_utf8(data, source, offset))

    def save(self, directory: PathLike) -> None:
        """Write ``lamemo_tokenizer.json`` and the model files into ``directory`` (created if needed).

        ``lamemo_tokenizer.json`` is written last, so a directory that has it is complete.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = self._write_model_files(directory)
        info = {
            "format": "lamemo-tokenizer",
            "version": FORMAT_VERSION,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "files": files,
            "options": self._options(),
            "fingerprint": self.fingerprint(),
        }
        atomic_write_text(directory / TOKENIZER_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")

    def fingerprint(self) -> str:
        """sha256 of everything that decides the ids; equal fingerprints mean identical tokenization."""
        digest = hashlib.sha256()
        head = {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id, **self._options()}
        digest.update(json.dumps(head, sort_keys=True).encode())
        digest.update(self._model_bytes())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    # -- hooks for the implementations -------------------------------------------------------------
    @abc.abstractmethod
    def _write_model_files(self, directory: Path) -> dict[str, str]:
        """Write the model files; return {role: file name}."""

    @abc.abstractmethod
    def _model_bytes(self) -> bytes:
        """The bytes that define the model (hashed into the fingerprint)."""

    def _options(self) -> dict[str, Any]:
        return {}


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece BPE or unigram model (see the module docstring for the normalization)."""

    MODEL_FILE = "tokenizer.model"

    def __init__(self, model_proto: bytes, kind: str) -> None:
        if kind not in ("bpe", "unigram"):
            raise DataError(f"sentencepiece kind must be 'bpe' or 'unigram', not {kind!r}")
        self.kind = kind
        self._proto = bytes(model_proto)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        except (RuntimeError, OSError) as exc:
            raise DataError(f"not a valid sentencepiece model: {exc}") from None
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        self.num_threads = -1
        """Threads sentencepiece uses to encode the lines of one call (-1: all cores); the preprocessing
        sets 1 in its worker processes, which already use every core."""
        if self.eos_id < 0 or self._sp.id_to_piece(self.eos_id) != EOS:
            raise DataError(f"sentencepiece model has no {EOS} piece as its eos symbol")

    def encode(self, text: str) -> list[int]:
        lines = split_lines_keepends(text)
        if not lines:
            return []
        # One call for all lines: sentencepiece batches them in C++; per-line encoding is what makes
        # chunked (parallel) tokenization exact (a unigram lattice over a whole file differs).
        return list(itertools.chain.from_iterable(self._sp.encode(lines, num_threads=self.num_threads)))

    def decode(self, ids: Iterable[int]) -> str:
        # Control symbols (<eos>) decode to nothing in sentencepiece.
        return self._sp.decode([int(i) for i in ids])

    def piece(self, token_id: int) -> str:
        """The sentencepiece piece of ``token_id`` (for inspection)."""
        return self._sp.id_to_piece(int(token_id))

    @property
    def model_proto(self) -> bytes:
        """The serialised sentencepiece model (``hf_tokenizer`` reads its pieces, scores and types)."""
        return self._proto

    def _write_model_files(self, directory: Path) -> dict[str, str]:
        _atomic_write_bytes(directory / self.MODEL_FILE, self._proto)
        return {"model": self.MODEL_FILE}

    def _model_bytes(self) -> bytes:
        return self._proto


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the byte values, 256 is ``<eos>``; raw bytes in, so any file is valid input."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes, source: str = "<bytes>", offset: int = 0) -> list[int]:
        return list(data)

    def decode(self, ids: Iterable[int]) -> str:
        # <eos> is a document boundary, not text; invalid UTF-8 (a model's sample) shows as U+FFFD.
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def _write_model_files(self, directory: Path) -> dict[str, str]:
        return {}

    def _model_bytes(self) -> bytes:
        return b"bytes-256+eos"


class WordTokenizer(Tokenizer):
    """Whitespace words, ``<eos>`` per line; vocabulary ``itos`` (``<eos>`` included) given or trained."""

    kind = "word"
    VOCAB_FILE = "vocab.txt"

    def __init__(self, itos: Sequence[str], *, lowercase: bool = False) -> None:
        self.itos = list(itos)
        self.stoi = {word: i for i, word in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise DataError("word vocabulary has duplicate entries")
        if EOS not in self.stoi:
            raise DataError(f"word vocabulary has no {EOS}")
        self.lowercase = lowercase
        self.vocab_size = len(self.itos)
        self.eos_id = self.stoi[EOS]
        self.unk_id: int | None = self.stoi.get(UNK)

    def encode(self, text: str) -> list[int]:
        if self.lowercase:
            text = text.lower()
        stoi, eos, unk = self.stoi, self.eos_id, self.unk_id
        ids: list[int] = []
        for line in split_lines_keepends(text):
            if unk is not None:
                ids.extend([stoi.get(w, unk) for w in line.split()])
            else:
                try:
                    ids.extend([stoi[w] for w in line.split()])
                except KeyError as exc:
                    raise DataError(
                        f"word {exc.args[0]!r} is not in the vocabulary and the vocabulary has no {UNK}; "
                        f"build the vocabulary from data that contains {UNK} or with a max size/min freq"
                    ) from None
            ids.append(eos)
        return ids

    def encode_document(self, text: str) -> list[int]:
        # Every line, the last one included, already ends with <eos>: the document boundary is the
        # last line's end, as in the pytorch word_language_model / Transformer-XL token counts.
        return self.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        line: list[str] = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.itos[i])
        if line:
            out.append(" ".join(line))
        return "".join(out)

    def _write_model_files(self, directory: Path) -> dict[str, str]:
        atomic_write_text(directory / self.VOCAB_FILE, "".join(w + "\n" for w in self.itos))
        return {"vocab": self.VOCAB_FILE}

    def _model_bytes(self) -> bytes:
        return "\n".join(self.itos).encode("utf-8")

    def _options(self) -> dict[str, Any]:
        return {"lowercase": self.lowercase}


# -- training --------------------------------------------------------------------------------------


def train_tokenizer(kind: str, files: Sequence[PathLike], out_dir: PathLike | None, **options: Any) -> Tokenizer:
    """Train (or, for ``byte``, just create) a tokenizer and save it into ``out_dir`` if given.

    Args:
        kind: ``"bpe"``, ``"unigram"``, ``"byte"`` or ``"word"``.
        files: training text files or folders (``.xz``/``.gz`` read transparently); only the training
            split, never valid/test.
        out_dir: directory to save into (``None``: do not save).
        **options: for bpe/unigram: ``vocab_size`` (8000), ``character_coverage`` (0.9995),
            ``byte_fallback`` (True), ``user_symbols`` (()), ``max_sentences`` (0 = all lines),
            ``max_sentence_length`` (16384 bytes), ``num_threads`` (cpu count), ``seed`` (0),
            ``spm_options`` (dict passed to sentencepiece as is). For word: ``lowercase`` (False),
            ``min_freq`` (1), ``max_size`` (None), ``user_symbols`` (()). byte takes none.

    Raises:
        DataError: unknown kind or option, empty or undecodable input, a vocabulary size sentencepiece
            cannot reach on this text.
    """
    if kind not in KINDS:
        raise DataError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
    trainer = _train_word if kind == "word" else _train_sentencepiece if kind in ("bpe", "unigram") else None
    known = set() if trainer is None else set(inspect.signature(trainer).parameters) - {"kind", "paths"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DataError(f"option(s) {unknown} do not apply to the {kind} tokenizer (known: {sorted(known) or 'none'})")
    if kind == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
    elif kind == "word":
        tokenizer = _train_word(expand_inputs(files), **options)
    else:
        tokenizer = _train_sentencepiece(kind, expand_inputs(files), **options)
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer


def _train_word(
    paths: Sequence[Path],
    *,
    lowercase: bool = False,
    min_freq: int = 1,
    max_size: int | None = None,
    user_symbols: Sequence[str] = (),
) -> WordTokenizer:
    counter: Counter[str] = Counter()
    for path in paths:
        n_lines = 0
        for line in iter_lines(path):
            n_lines += 1
            counter.update((line.lower() if lowercase else line).split())
        if n_lines == 0:
            raise DataError(f"{path}: empty file (no text to build a vocabulary from)")
    specials = [EOS] + [s for s in user_symbols if s != EOS]
    # most_common sorts by count and keeps first-occurrence order among ties (a stable sort), which
    # reproduces Transformer-XL's vocabulary order exactly.
    candidates = [w for w, _ in counter.most_common() if w not in specials]
    words = [w for w in candidates if counter[w] >= min_freq]
    room = None if max_size is None else max(0, max_size - len(specials))
    if room is not None and len(words) > room:
        words = words[:room]
    if len(words) < len(candidates) and UNK not in specials and UNK not in words:
        # Something was cut, so unknown words need an id: give <unk> one inside max_size.
        specials.append(UNK)
        if room is not None and len(words) >= room:
            words = words[: max(0, room - 1)]
    if not words:
        raise DataError("no words found in the training files")
    return WordTokenizer(specials + words, lowercase=lowercase)


def _train_sentencepiece(
    kind: str,
    paths: Sequence[Path],
    *,
    vocab_size: int = 8000,
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    user_symbols: Sequence[str] = (),
    max_sentences: int = 0,
    max_sentence_length: int = 16384,
    num_threads: int | None = None,
    seed: int = 0,
    spm_options: dict[str, Any] | None = None,
) -> SentencePieceTokenizer:
    failure: list[BaseException] = []

    def sentences() -> Iterator[str]:
        # Errors raised in here reach sentencepiece's C++ loop, which wraps them in RuntimeError;
        # keep the original so the user sees our message, not "INTERNAL: ...".
        try:
            for path in paths:
                n = 0
                for line in progress(iter_lines(path), desc=f"tokenizer: read {Path(path).name}", unit="line"):
                    n += 1
                    if line:
                        yield line
                if n == 0:
                    raise DataError(f"{path}: empty file (no text to train a tokenizer on)")
        except BaseException as exc:
            failure.append(exc)
            raise

    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(seed)
    proto = io.BytesIO()
    # "\n" must be a piece of its own: sentencepiece trains on single lines and would otherwise never
    # see it; with byte fallback it would still round-trip, but as a byte piece rather than one id.
    symbols = ["\n"] + [s for s in user_symbols if s not in (EOS, "\n")]
    args: dict[str, Any] = dict(
        model_type=kind,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        unk_id=0,
        eos_id=1,
        bos_id=-1,
        pad_id=-1,
        unk_piece=UNK,
        eos_piece=EOS,
        user_defined_symbols=symbols,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=max_sentence_length,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    args.update(spm_options or {})
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=proto, **args)
    except RuntimeError as exc:
        if failure:
            raise failure[0] from None
        message = str(exc).split("]", 1)[-1].strip() or str(exc)
        raise DataError(f"sentencepiece {kind} training failed: {message}") from None
    return SentencePieceTokenizer(proto.getvalue(), kind)


# -- loading and checks ----------------------------------------------------------------------------


def tokenizer_description(directory: PathLike) -> Path | None:
    """The file that describes the tokenizer saved in ``directory``: ``lamemo_tokenizer.json``, or in a
    directory written before that name, ``tokenizer.json`` when it is ours (not transformers'); None if none."""
    directory = Path(directory)
    if (directory / TOKENIZER_FILE).is_file():
        return directory / TOKENIZER_FILE
    legacy = directory / LEGACY_TOKENIZER_FILE
    try:
        if legacy.is_file() and json.loads(legacy.read_text(encoding="utf-8")).get("format") == "lamemo-tokenizer":
            return legacy
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        pass
    return None


def load_tokenizer(directory: PathLike) -> Tokenizer:
    """Load a tokenizer saved by :meth:`Tokenizer.save` (``lamemo_tokenizer.json`` + model files).

    Raises:
        DataError: missing directory or files, unknown kind, or files that disagree with lamemo_tokenizer.json.
    """
    directory = Path(directory)
    info_path = tokenizer_description(directory)
    if info_path is None:
        raise DataError(
            f"no {TOKENIZER_FILE} in {directory}: expected a tokenizer directory written by tools/train_tokenizer.py"
        )
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        kind = info["kind"]
        files = info.get("files", {})
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
        raise DataError(f"{info_path} is not a valid tokenizer description ({exc})") from None

    def model_file(role: str) -> Path:
        path = directory / files.get(role, "")
        if role not in files or not path.is_file():
            raise DataError(f"{directory}: {info_path.name} names a {role} file that is missing ({path.name})")
        return path

    tokenizer: Tokenizer
    if kind in ("bpe", "unigram"):
        tokenizer = SentencePieceTokenizer(model_file("model").read_bytes(), kind)
    elif kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "word":
        text = model_file("vocab").read_text(encoding="utf-8")
        itos = text.split("\n")
        if itos and itos[-1] == "":
            itos.pop()
        tokenizer = WordTokenizer(itos, lowercase=bool(info.get("options", {}).get("lowercase", False)))
    else:
        raise DataError(f"{info_path}: unknown tokenizer kind {kind!r} (known: {', '.join(KINDS)})")
    for key in ("vocab_size", "eos_id", "fingerprint"):
        actual = tokenizer.fingerprint() if key == "fingerprint" else getattr(tokenizer, key)
        if key in info and info[key] != actual:
            raise DataError(
                f"{directory}: {info_path.name} says {key}={info[key]} but the model files give "
                f"{actual}; the directory was modified or mixed up"
            )
    return tokenizer


def check_vocab_matches(tokenizer: Tokenizer, vocab_size: int, *, allow_padding: bool = False) -> None:
    """Raise a clear ``ValueError`` (:class:`DataError`) unless the model's ``vocab_size`` fits.

    Args:
        tokenizer: the tokenizer the data was made with.
        vocab_size: the model's vocabulary (embedding rows).
        allow_padding: accept a model vocabulary larger than the tokenizer's (Megatron-style padding to
            a multiple of the tensor-parallel size); never a smaller one.
    """
    ok = vocab_size >= tokenizer.vocab_size if allow_padding else vocab_size == tokenizer.vocab_size
    if not ok:
        relation = "at least" if allow_padding else "exactly"
        raise DataError(
            f"tokenizer/model vocabulary mismatch: the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids "
            f"but the model's vocab_size is {vocab_size} (it must be {relation} {tokenizer.vocab_size}); "
            "set the model's vocab_size from the tokenizer or use the tokenizer the model was trained with"
        )


# -- small file helpers ------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))
