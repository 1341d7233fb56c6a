"""sb-eval: long-context evaluation of stick-breaking attention language models, as a plugin for
EleutherAI's lm-evaluation-harness.

Importing the package does nothing else: each sub-package is imported where it is used
(docs/architecture.md has the map). ``import sb_eval.model`` registers stick-breaking
checkpoints with transformers' Auto classes.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a checkout, the sub-packages kernels/, ruler/ and tasks/ sit beside this folder (the wheel puts
# them inside it), and Python started in the checkout's root imports this folder rather than an
# installed copy: there they are found through the checkout's root. They are namespace packages
# (no __init__.py), so that the root's kernels/ never shadows the `kernels` distribution that
# transformers imports.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "kernels" / "attention.py").is_file():
    __path__.append(str(_checkout))
