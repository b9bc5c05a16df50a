"""Architectures, one module per `config.json` `model_type`.

`get_architecture(model_type)` returns the module; each module defines `ModelArgs` (a dataclass built with
`ModelArgs.from_config(dict)`) and `Model(args, weights)`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ConfigError

# model_type -> module name under skvrt.models. Llama covers SmolLM/SmolLM2, Llama 2/3, TinyLlama, Mistral-style.
ARCHITECTURES = {"llama": "llama", "mistral": "llama"}


def get_architecture(model_type: str | None) -> ModuleType:
    if not model_type:
        raise ConfigError("config.json has no 'model_type'; cannot tell which architecture to load")
    name = ARCHITECTURES.get(model_type)
    if name is None:
        raise ConfigError(
            f"unsupported architecture model_type={model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )
    return importlib.import_module(f"{__name__}.{name}")
