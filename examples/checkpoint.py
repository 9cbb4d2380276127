"""Hugging Face checkpoints (``config.json`` + safetensors) to and from the decoders of :mod:`models`.

Only local directories are read (no network). The safetensors format is small enough to implement with
numpy and json: an 8-byte little-endian header length, a JSON header mapping each tensor's name to its
``dtype``, ``shape`` and ``data_offsets`` (byte range in the data that follows), then the raw row-major
little-endian bytes (this module assumes a little-endian host, as every platform jax runs on is).
Hugging Face stores a linear layer's weight as [out, in]; Flax's ``nnx.Linear`` kernel is [in, out].
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from models import Decoder, Llama3RopeScaling, ModelConfig, abstract

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}  # fmt: skip
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


# ----------------------------------------------------------------------------------------- safetensors
def read_safetensors_header(path: pathlib.Path) -> tuple[dict[str, dict[str, Any]], int]:
    """The tensors' entries of a safetensors file (without ``__metadata__``) and where their data begins."""
    with open(path, "rb") as f:
        (length,) = np.frombuffer(f.read(8), "<u8")
        header = json.loads(f.read(int(length)))
    header.pop("__metadata__", None)
    return header, 8 + int(length)


def read_tensor(path: pathlib.Path, entry: dict[str, Any], data_start: int) -> np.ndarray:
    """One tensor of a safetensors file, memory-mapped (read-only) rather than read whole."""
    begin, end = entry["data_offsets"]
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(end - begin,))
    return data.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file."""
    header, data_start = read_safetensors_header(path)
    return {name: read_tensor(path, entry, data_start) for name, entry in header.items()}


def write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    """Write ``tensors`` (numpy arrays of the dtypes in :data:`DTYPES`) as one safetensors file."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    arrays = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    for name, array in arrays.items():
        header[name] = {"dtype": DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}  # fmt: skip
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(np.uint64(len(encoded)).astype("<u8").tobytes())
        f.write(encoded)
        for array in arrays.values():
            f.write(array.tobytes())


# ----------------------------------------------------------------------------------------- config.json
def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> ModelConfig:
    """A :class:`ModelConfig` from a Hugging Face ``config.json`` of a Llama or Qwen3 model."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(f"model_type {family!r} is not one of {sorted(ARCHITECTURES)}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("linear layers with biases are not supported")
    if hf.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported")
    rope = hf.get("rope_parameters") or {}  # newer configs keep theta and scaling here
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling_entry = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    scaling = None
    if scaling_entry:
        kind = scaling_entry.get("rope_type", scaling_entry.get("type"))
        if kind != "llama3":
            raise ValueError(f"RoPE scaling {kind!r} is not supported (only 'llama3')")
        scaling = Llama3RopeScaling(
            factor=float(scaling_entry["factor"]),
            low_freq_factor=float(scaling_entry["low_freq_factor"]),
            high_freq_factor=float(scaling_entry["high_freq_factor"]),
            original_max_position=int(scaling_entry["original_max_position_embeddings"]),
        )
    heads = int(hf["num_attention_heads"])
    return ModelConfig(
        family=family,
        vocab=int(hf["vocab_size"]),
        hidden=int(hf["hidden_size"]),
        layers=int(hf["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        mlp=int(hf["intermediate_size"]),
        tied=bool(hf.get("tie_word_embeddings", False)),
        qk_norm=family == "qwen3",
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        dtype=dtype or hf.get("dtype") or hf.get("torch_dtype") or "bfloat16",
    )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` entries that :func:`config_from_hf` reads back into ``config``."""
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab,
        "hidden_size": config.hidden,
        "num_hidden_layers": config.layers,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.mlp,
        "tie_word_embeddings": config.tied,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.norm_eps,
        "torch_dtype": config.dtype,
    }
    if config.rope_scaling is not None:
        s = config.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings": s.original_max_position}  # fmt: skip
    return hf


# ----------------------------------------------------------------------------------------- weights
def hf_parameters(model: Decoder) -> Iterator[tuple[str, nnx.Param, bool]]:
    """(Hugging Face name, the model's parameter, whether Hugging Face stores it transposed) per weight."""
    yield "model.embed_tokens.weight", model.embed.embedding, False
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}"
        yield f"{prefix}.input_layernorm.weight", layer.attn_norm.scale, False
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{prefix}.self_attn.{name}.weight", getattr(layer.attn, name).kernel, True
        if layer.attn.q_norm is not None and layer.attn.k_norm is not None:
            yield f"{prefix}.self_attn.q_norm.weight", layer.attn.q_norm.scale, False
            yield f"{prefix}.self_attn.k_norm.weight", layer.attn.k_norm.scale, False
        yield f"{prefix}.post_attention_layernorm.weight", layer.mlp_norm.scale, False
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield f"{prefix}.mlp.{name}.weight", getattr(layer.mlp, name).kernel, True
    yield "model.norm.weight", model.norm.scale, False
    if model.lm_head is not None:
        yield "lm_head.weight", model.lm_head.kernel, True


def is_checkpoint(directory: str | pathlib.Path) -> bool:
    """Whether ``directory`` holds a checkpoint :func:`load` can read (``config.json`` and safetensors)."""
    directory = pathlib.Path(directory).expanduser()
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def load(directory: str | pathlib.Path, dtype: str | None = None) -> Decoder:
    """The decoder stored in a local Hugging Face checkpoint directory (``config.json`` and one or more
    ``*.safetensors`` files), its weights cast to ``dtype`` (default: the checkpoint's)."""
    directory = pathlib.Path(directory).expanduser()
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} is not a Hugging Face checkpoint directory: no config.json")
    config = config_from_hf(json.loads((directory / "config.json").read_text()), dtype)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    where: dict[str, tuple[pathlib.Path, dict[str, Any], int]] = {}
    for path in files:
        header, data_start = read_safetensors_header(path)
        where.update({name: (path, entry, data_start) for name, entry in header.items()})
    model = abstract(config)
    for name, param, transposed in hf_parameters(model):
        if name not in where:
            raise KeyError(f"{name} is missing from the checkpoint in {directory}")
        array = read_tensor(*where[name])
        array = array.T if transposed else array
        expected = param.get_value()
        if array.shape != expected.shape:
            raise ValueError(f"{name}: the checkpoint has shape {array.shape}, the model expects {expected.shape}")
        param.set_value(jax.device_put(np.asarray(array, dtype=expected.dtype)))
    return model


def save(model: Decoder, directory: str | pathlib.Path) -> None:
    """Write ``model`` as a Hugging Face checkpoint: ``config.json`` and ``model.safetensors``."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2))
    tensors = {}
    for name, param, transposed in hf_parameters(model):
        array = np.asarray(jnp.asarray(param.get_value()))
        tensors[name] = array.T if transposed else array
    write_safetensors(directory / "model.safetensors", tensors)
