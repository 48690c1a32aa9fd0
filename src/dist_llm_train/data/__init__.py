"""Data: corpora, tokenizers, cached token arrays, shards and deterministic batches.

Typical use::

    data = prepare_data(cfg.data, block_size=model_block_size)
    batch = get_batch(data.train, batch_size, block_size, seed, step, shard.start, shard.end)
    x, y = batch[:, :-1], batch[:, 1:]
"""

from __future__ import annotations

from dist_llm_train.data.corpora import (
    TINYSHAKESPEARE_MD5,
    TINYSHAKESPEARE_URL,
    WIKITEXT2_URL,
    Corpus,
    download_file,
    load_corpus,
    load_files,
    load_python_stdlib,
    load_wikitext2,
    resolve_tinyshakespeare,
    stdlib_files,
)
from dist_llm_train.data.dataset import (
    PreparedData,
    Shard,
    get_batch,
    iter_eval_batches,
    make_shards,
    prepare_data,
    split_text,
    token_dtype,
)
from dist_llm_train.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_json,
)

__all__ = [
    "TINYSHAKESPEARE_MD5",
    "TINYSHAKESPEARE_URL",
    "WIKITEXT2_URL",
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "Corpus",
    "PreparedData",
    "Shard",
    "Tokenizer",
    "build_tokenizer",
    "download_file",
    "get_batch",
    "iter_eval_batches",
    "load_corpus",
    "load_files",
    "load_python_stdlib",
    "load_tokenizer",
    "load_wikitext2",
    "make_shards",
    "prepare_data",
    "resolve_tinyshakespeare",
    "split_text",
    "stdlib_files",
    "token_dtype",
    "tokenizer_from_json",
]
