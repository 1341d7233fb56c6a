"""The stick-breaking language model in transformers: its configuration (config.json in the
dolomite format of the released checkpoints), the model, checks of a checkpoint folder before it
is loaded, and writing checkpoints. Importing it registers ``model_type: "stickbreaking"`` with
transformers' Auto classes.
"""

from .configuration import StickBreakingConfig
from .modeling import StickBreakingForCausalLM, StickBreakingModel

__all__ = ["StickBreakingConfig", "StickBreakingForCausalLM", "StickBreakingModel"]
