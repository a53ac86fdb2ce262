"""quietstar: make any Hugging Face causal LM think before every token (Quiet-STaR).

Importing the package registers the ``quietstar_*`` attention paths with transformers and the
``quietstar`` model type with ``AutoConfig`` / ``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .attention import THOUGHT_ATTENTION_NAMES, register_attention_paths
from .configuration import END_THOUGHT_TOKEN, START_THOUGHT_TOKEN, QuietStarConfig
from .inputs import add_thought_tokens, check_thought_tokens
from .layout import ThoughtLayout
from .modeling import QuietStarForCausalLM, QuietStarOutput

register_attention_paths()  # once, here: every quietstar module is imported through this package
AutoConfig.register(QuietStarConfig.model_type, QuietStarConfig, exist_ok=True)
AutoModelForCausalLM.register(QuietStarConfig, QuietStarForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "QuietStarConfig",
    "QuietStarForCausalLM",
    "QuietStarOutput",
    "ThoughtLayout",
    "THOUGHT_ATTENTION_NAMES",
    "START_THOUGHT_TOKEN",
    "END_THOUGHT_TOKEN",
    "add_thought_tokens",
    "check_thought_tokens",
]
