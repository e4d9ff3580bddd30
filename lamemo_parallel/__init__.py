"""LaMemo model library: the single-device model, its memory state and the pieces parallel runs reuse.

Importable with plain torch (no deepspeed / megatron-core needed)."""
from .config import ConfigError, LaMemoConfig
from .memory import LaMemoMemory, MemoryMismatchError
from .model import CheckpointMismatchError, LaMemoModel, LaMemoOutput

__all__ = ["LaMemoConfig", "LaMemoModel", "LaMemoOutput", "LaMemoMemory", "ConfigError",
           "CheckpointMismatchError", "MemoryMismatchError"]
