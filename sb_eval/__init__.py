"""sb-eval: long-context evaluation of stick-breaking attention language models.

Importing it registers ``model_type: "stickbreaking"`` with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(folder)`` loads dolomite stick-breaking checkpoints.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import StickBreakingConfig
from .modeling import StickBreakingForCausalLM, StickBreakingModel

__version__ = "0.1.0"

AutoConfig.register(StickBreakingConfig.model_type, StickBreakingConfig, exist_ok=True)
AutoModelForCausalLM.register(StickBreakingConfig, StickBreakingForCausalLM, exist_ok=True)

__all__ = ["StickBreakingConfig", "StickBreakingForCausalLM", "StickBreakingModel"]
