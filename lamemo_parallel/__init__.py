"""LaMemo model library: the single-device model, its memory state and the pieces parallel runs reuse.

Importable with plain torch (no deepspeed / megatron-core needed)."""
from .config import ConfigError, LaMemoConfig
from .memory import LaMemoMemory, MemoryMismatchError
from .model import LaMemoModel, LaMemoOutput
from .model_files import CheckpointMismatchError

__all__ = ["LaMemoConfig", "LaMemoModel", "LaMemoOutput", "LaMemoMemory", "ConfigError",
           "CheckpointMismatchError", "MemoryMismatchError"]
