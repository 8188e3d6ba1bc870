"""megafusion.hf: megafusion models in Hugging Face `transformers` format, both ways.

  configuration_megafusion.py  MegafusionConfig (model_type "megafusion")      } self-contained: copied into exported
  modeling_megafusion.py       MegafusionForMultimodalLM, plain PyTorch        } folders as remote code (auto_map)
  adapter.py                   MegafusionStateDictAdapter (megatron <-> HF parameter names and layouts),
                               hf_config_from_megafusion, model_overrides_from_hf

transformers is an optional extra (pip install transformers): importing this package without it is an ImportError
that says so. Names are imported lazily, so the adapter (which imports megatron) loads only when used.
`register()` makes AutoConfig / AutoModel know "megafusion" without trust_remote_code.
"""

import importlib
import importlib.util

if importlib.util.find_spec("transformers") is None:
    raise ImportError("megafusion.hf needs Hugging Face transformers, an optional extra: pip install transformers "
                      "(or pip install 'megafusion[vision]')")

_EXPORTS = {
    "MegafusionConfig": "megafusion.hf.configuration_megafusion",
    "AUTO_MAP": "megafusion.hf.configuration_megafusion",
    "MegafusionForMultimodalLM": "megafusion.hf.modeling_megafusion",
    "MegafusionModel": "megafusion.hf.modeling_megafusion",
    "MegafusionOutput": "megafusion.hf.modeling_megafusion",
    "MegafusionPreTrainedModel": "megafusion.hf.modeling_megafusion",
    "MegafusionStateDictAdapter": "megafusion.hf.adapter",
    "hf_config_from_megafusion": "megafusion.hf.adapter",
    "model_overrides_from_hf": "megafusion.hf.adapter",
}

__all__ = sorted(_EXPORTS) + ["register"]


def register() -> None:
    """Register MegafusionConfig / MegafusionForMultimodalLM with AutoConfig and AutoModel (idempotent)."""
    from transformers import AutoConfig, AutoModel

    from megafusion.hf.configuration_megafusion import MegafusionConfig
    from megafusion.hf.modeling_megafusion import MegafusionForMultimodalLM

    AutoConfig.register(MegafusionConfig.model_type, MegafusionConfig, exist_ok=True)
    AutoModel.register(MegafusionConfig, MegafusionForMultimodalLM, exist_ok=True)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megafusion.hf' has no attribute {name!r}")
