"""The Python surface: `load()` a checkpoint, then `chat`, `generate`, `prepare`, `forward` on the VLM."""

from __future__ import annotations

import json
import os
import uuid
from contextlib import closing
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import LlavaConfig
from .engine.async_engine import EngineConfig
from .engine.core import Engine, run_to_completion
from .engine.sampling import SamplingParams
from .errors import ConfigError, GenerationError, PromptError
from .processing.processor import IMAGE_DETAILS, Batch, Encoded, Processor
from .checkpoint import open_checkpoint, resolve_dtype, save_checkpoint  # noqa: F401  (resolve_dtype: re-exported)


@dataclass(frozen=True)
class ChatOutput:
    """One finished answer."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached
    prompt_tokens: int
    completion_tokens: int

    def __str__(self) -> str:
        return self.text


def _eos_ids(folder: Path, cfg: LlavaConfig, processor: Processor) -> set[int]:
    """End-of-sequence ids: generation_config.json's (what transformers' generate stops on), else config and tokenizer."""
    gen = folder / "generation_config.json"
    ids: set[int] = set()
    if gen.is_file():
        try:
            value = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise ConfigError(f"{gen} is not valid JSON: {e}") from e
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    if not ids:
        ids.update(cfg.text.eos_token_ids)
        tok_eos = processor.tokenizer.token_id(processor.tokenizer.eos_token)
        if tok_eos is not None:
            ids.add(tok_eos)
    return {int(i) for i in ids}


def _check_many(conversations: list[Any], method: str) -> None:
    """A list of conversations, not one conversation (a list of messages) passed by mistake."""
    if conversations and isinstance(conversations[0], dict):
        raise PromptError(f"{method}() takes a list of conversations; wrap a single one in a list.")


class VLM:
    """A loaded LLaVA model with its processor. Build it with `llavakit.load()`."""

    # With tensor_parallel_size > 1: rank 0's Driver of the other ranks (llavakit/parallel/driver.py).
    parallel = None

    def __init__(self, model, processor: Processor, cfg: LlavaConfig, folder: Path, eos_ids: set[int],
                 engine_config: EngineConfig = EngineConfig()):
        self.model = model
        self.processor = processor
        self.config = cfg
        self.folder = folder
        self.eos_ids = eos_ids
        self.engine_config = engine_config
        self._engine: Engine | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights were loaded in."""
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.model.device

    # -- inputs -------------------------------------------------------------------------------
    def prepare(self, conversations: list[Any], add_generation_prompt: bool | None = None,
                parse_special_tokens_in_content: bool = False, continue_final_message: bool = False) -> Batch:
        """Token ids (left-padded), attention mask and pixel values for a list of conversations.

        parse_special_tokens_in_content: False (the default) tokenizes message text as plain text, so
        text such as `<|im_start|>system` or `<image>` in a message cannot forge a turn or a placeholder;
        True parses it as special tokens, as transformers' apply_chat_template does (trusted text only).
        continue_final_message: end each prompt right after its last message's text, so that the model
        continues that message (an assistant prefill), as transformers' apply_chat_template does.
        add_generation_prompt: open a new assistant turn at the end; None (the default) does unless
        continue_final_message is set. Both True is a PromptError.
        """
        _check_many(conversations, "prepare")
        return self.processor.prepare(conversations, add_generation_prompt, parse_special_tokens_in_content,
                                      continue_final_message)

    def forward(self, batch: Batch, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) as float32 for every position of a prepared batch; (B, 1, V) for the last
        position only with `last_only` (batches are left-padded, so it is every row's last token)."""
        mask = batch.attention_mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        valid = mask.bool() if bool((mask == 0).any()) else None
        with torch.inference_mode():
            embeds = self.model.embed_inputs(batch.input_ids, batch.pixel_values, batch.image_layouts,
                                             batch.video_pixels, batch.video_layouts)
            return self.model.decode(embeds, positions, valid, None, last_only=last_only).float()

    # -- generation ---------------------------------------------------------------------------
    def _params(self, sampling: SamplingParams | None, **values) -> SamplingParams:
        return sampling if sampling is not None else SamplingParams(**values)

    def sampling_params(self, **values) -> SamplingParams:
        """`SamplingParams(**values)` for `generate`, for callers that do not import the engine (training)."""
        return SamplingParams(**values)

    @property
    def engine(self) -> Engine:
        """The continuous-batching engine `chat` and `generate` run on (built on first use)."""
        if self._engine is None:
            self._engine = Engine(self.model, self.processor.tokenizer, self.eos_ids, self.engine_config)
        return self._engine

    def chat(
        self,
        messages: list[dict],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: tuple[str, ...] | list[str] | str = (),
        stream: bool = False,
        sampling: SamplingParams | None = None,
        parse_special_tokens_in_content: bool = False,
        continue_final_message: bool = False,
        add_generation_prompt: bool | None = None,
    ) -> ChatOutput | Iterator[str]:
        """Answer one conversation. With `stream=True`, return an iterator of text pieces instead.

        `sampling` replaces the individual sampling arguments when given.
        `parse_special_tokens_in_content`, `continue_final_message`, `add_generation_prompt`: see
        `prepare`. With `continue_final_message=True` the answer continues the last message (say, an
        assistant message "The picture shows") and holds only the new text.
        """
        params = self._params(sampling, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, stop=stop)
        encoded = self.processor.encode(messages, add_generation_prompt, parse_special_tokens_in_content,
                                        continue_final_message)
        if stream:
            return self._stream(encoded, params)
        return self._run([encoded], [params])[0]

    def generate(self, conversations: list[Any], sampling: SamplingParams | list[SamplingParams] | None = None,
                 parse_special_tokens_in_content: bool = False,
                 continue_final_message: bool | list[bool] = False,
                 add_generation_prompt: bool | None = None) -> list[ChatOutput]:
        """Answer many conversations together on the engine (continuous batching); results come back in order.

        `parse_special_tokens_in_content`: see `prepare`; by default message text is plain text.
        `continue_final_message`: see `prepare`; one bool for all, or a list with one per conversation.
        `add_generation_prompt`: see `prepare` (None: each conversation that is not continued gets one).

        Raises GenerationError (NonFiniteLogits) naming the conversation when one of them cannot be
        sampled (NaN or infinite logits); the others are stopped with it.
        """
        if isinstance(sampling, list):
            if len(sampling) != len(conversations):
                raise GenerationError(f"{len(sampling)} sampling params given for {len(conversations)} conversations.")
            params = sampling
        else:
            params = [sampling or SamplingParams()] * len(conversations)
        _check_many(conversations, "generate")
        if isinstance(continue_final_message, list):
            if len(continue_final_message) != len(conversations):
                raise PromptError(f"{len(continue_final_message)} continue_final_message values given for "
                                  f"{len(conversations)} conversations; give one per conversation, or one bool.")
            continues = continue_final_message
        else:
            continues = [continue_final_message] * len(conversations)
        parse = parse_special_tokens_in_content
        return self._run([self.processor.encode(c, add_generation_prompt, parse, bool(cont))
                          for c, cont in zip(conversations, continues)], params)

    generate_many = generate

    def _stream(self, encoded: Encoded, params: SamplingParams) -> Iterator[str]:
        request_id = f"stream-{uuid.uuid4().hex}"
        # closing(): stopping the stream early aborts the request and frees its slot at once
        with closing(run_to_completion(self.engine, [(request_id, encoded, params)])) as deltas:
            for _, delta in deltas:
                if delta.error is not None:  # e.g. NonFiniteLogits; the engine has finished the request
                    raise delta.error
                if delta.text:
                    yield delta.text

    def _run(self, encoded: list[Encoded], params: list[SamplingParams]) -> list[ChatOutput]:
        tag = uuid.uuid4().hex
        index = {f"{tag}-{i}": i for i in range(len(encoded))}
        texts, ids = [[] for _ in encoded], [[] for _ in encoded]
        reasons: list[str | None] = [None] * len(encoded)
        # closing(): a failure aborts the other requests of this call before it propagates
        with closing(run_to_completion(self.engine, zip(index, encoded, params))) as deltas:
            for rid, d in deltas:
                i = index[rid]
                if d.error is not None:  # e.g. NonFiniteLogits: the call fails; the others are aborted
                    if len(encoded) == 1:
                        raise d.error
                    raise type(d.error)(f"conversation {i}: {d.error}") from d.error
                texts[i].append(d.text)
                ids[i].append(d.token_id)
                if d.finish_reason:
                    reasons[i] = d.finish_reason
        return [ChatOutput("".join(texts[i]), ids[i], reasons[i], len(encoded[i].input_ids), len(ids[i]))
                for i in range(len(encoded))]

    # -- persistence and introspection --------------------------------------------------------
    def save_pretrained(self, out: str | os.PathLike, max_shard_bytes: int = 5 * 2**30) -> Path:
        """Write a Hugging Face checkpoint folder (weights in this model's dtype, plus every side file).

        A quantised model writes its int8/int4 weights and scales and says so in config.json's
        `quantization_config`; `llavakit.load` reads such a folder back quantised, with identical logits.
        """
        if self.parallel is not None:
            raise ConfigError("this model is split over tensor-parallel ranks, and this process holds only its "
                              "share; load it without tensor_parallel_size to save it.")
        return save_checkpoint(self.model, self.config, self.folder, out, max_shard_bytes)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (a no-op for a model in one process); the model cannot run
        after. Called at exit anyway; call it to free the other processes sooner."""
        if self.parallel is not None:
            self.parallel.close()

    def image_layout(self, image: Any, detail: str | None = None) -> dict:
        """How one image (path, URL, bytes or PIL) is cut into tiles and how many tokens it costs, alone
        in a prompt with `detail` "auto", "low" or "high" (None: the default given to `llavakit.load`)."""
        from . import anyres
        from .processing.image import load_image

        im = load_image(image)
        cfg = self.config
        x = self.processor.choose_layout((im.height, im.width), 1, detail)
        layout = {"size": list(x.size), "tokens": x.tokens}
        if x.tiled:
            layout["best_resolution"] = list(anyres.select_best_resolution(x.size, cfg.image_grid_pinpoints))
            layout["grid"] = list(x.grid)
        layout["tiles"] = x.tiles
        return layout

    def info(self) -> dict:
        """Architecture, sizes, special token ids and template of this checkpoint."""
        cfg, tok = self.config, self.processor.tokenizer
        n_params = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        if self.parallel is not None:  # this process holds only its share
            n_params = self.parallel.parameters
        return {
            "folder": str(self.folder),
            "model_type": cfg.model_type,
            "text_model": cfg.text.model_type,
            "vision_model": cfg.vision.model_type,
            "parameters": n_params,
            "dtype": str(self.dtype).removeprefix("torch."),
            "text": {"layers": cfg.text.num_layers, "hidden_size": cfg.text.hidden_size,
                     "heads": cfg.text.num_heads, "kv_heads": cfg.text.num_kv_heads, "vocab_size": cfg.text.vocab_size,
                     "rope": cfg.text.rope.kind, "rope_theta": cfg.text.rope.theta,
                     "sliding_window": next((w for w in cfg.text.sliding_windows if w), None),
                     "tied_embeddings": cfg.tie_word_embeddings},
            "vision": {"layers": cfg.vision.num_layers, "hidden_size": cfg.vision.hidden_size,
                       "image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size,
                       "feature_layers": list(cfg.vision_feature_layers), "select_strategy": cfg.select_strategy},
            "image_tokens_per_image": self.processor.features_per_image or "depends on the image size",
            "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints] or None,
            "tokens": {"image": [tok.image_token, cfg.image_token_id],
                       **({"video": [tok.video_token, cfg.video_token_id]} if cfg.video_token_id is not None else {}),
                       "bos": [tok.bos_token, tok.token_id(tok.bos_token)],
                       "eos": sorted(self.eos_ids), "pad": self.processor.pad_token_id},
            "chat_template": self.processor.chat_template,
        }


def load(name_or_path: str | os.PathLike, dtype: torch.dtype | str | None = "auto",
         device: str | torch.device = "cpu",
         revision: str | None = None, vision_tower: str | os.PathLike | None = None,
         conv_template: str | None = None, quantize: str = "none", image_detail: str = "auto",
         max_image_tokens: int | None = None, tensor_parallel_size: int = 1) -> VLM:
    """Load a LLaVA checkpoint from a local folder, a hub id, or by name `llava-shapes` (the tiny model
    shipped with llavakit), in the llava-hf or the original format.

    name_or_path: a folder wins over a name: a folder called llava-shapes in the working directory is
    what "llava-shapes" loads (see weights.resolve_model_dir).

    dtype: a torch dtype or its name ("float32", "bfloat16", "float16"), or "auto" for the checkpoint's
    own (float16 checkpoints run as bfloat16 on CPU, float32 ones as bfloat16 on a GPU).
    device: "cpu", "cuda", "cuda:1", ... (or a torch.device): where the weights, KV cache and every
    step's tensors live. Sampling other than plain greedy runs on the CPU on any device.
    vision_tower, conv_template: original-format checkpoints only: the CLIP/SigLIP folder when the
    checkpoint does not store its tower, and the conversation template when the name does not tell.
    quantize: "none", "int8" or "int4": weight-only quantisation of the decoder and the output head in
    groups of 32 values with one scale each (about 2x / 4x fewer bytes read per decoded token than
    bfloat16), done tensor by tensor while reading; see llavakit/model/quant.py. A checkpoint saved
    quantised by `save_pretrained` loads quantised whatever this says ("none" or its own method).
    image_detail: how images without their own "detail" are encoded: "auto" (the checkpoint's any-res
    tiling), "low" (one tile: fewest tokens, fastest) or "high" (any-res even among several images).
    max_image_tokens: an image's token budget: an "auto" image over it is encoded "low"; a "high" one
    over it is refused (PromptError). None: no budget.
    tensor_parallel_size: split the model over N processes (ranks) that run each forward together,
    Megatron-style (llavakit/parallel): each holds about 1/N of the weights and of the key/value
    cache. This process is rank 0 and starts the others (on a CPU they share its torch threads); under
    torchrun, the ranks are torchrun's, and the call returns on rank 0 only. An N that does not divide
    the model's heads, or more ranks than CPU cores or GPUs, is a ConfigError before any weight is
    read. Close the model (`vlm.close()`) to stop the other ranks; see docs/multiple-devices.md.
    """
    if image_detail not in IMAGE_DETAILS:
        raise ConfigError(f"image_detail {image_detail!r} is not one of {', '.join(IMAGE_DETAILS)}.")
    if max_image_tokens is not None and (isinstance(max_image_tokens, bool) or not isinstance(max_image_tokens, int)
                                         or max_image_tokens < 1):
        raise ConfigError(f"max_image_tokens must be a positive integer or None, got {max_image_tokens!r}.")
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ConfigError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}.")
    driver = None
    if tensor_parallel_size == 1:
        ckpt = open_checkpoint(name_or_path, dtype, device, revision, vision_tower, conv_template, quantize)
    else:
        from .parallel.launch import open_parallel

        ckpt, driver = open_parallel(name_or_path, dtype, device, revision, vision_tower, conv_template, quantize,
                                     tensor_parallel_size)
    processor = dataclasses.replace(ckpt.processor, image_detail=image_detail, max_image_tokens=max_image_tokens)
    vlm = VLM(ckpt.model, processor, ckpt.config, ckpt.folder, _eos_ids(ckpt.folder, ckpt.config, processor))
    vlm.parallel = driver
    return vlm
