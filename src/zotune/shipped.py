"""What ships in the source tree beside the code: the default model, by name and folder.

A run records the default model by its name, not by this machine's path to it, so that its
config.json means the same checkpoint on the machine the run is resumed, swept or exported on."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_NAME = "zotune-roberta-small"
SHIPPED_MODELS = {DEFAULT_MODEL_NAME: REPO_ROOT / "models" / DEFAULT_MODEL_NAME}
