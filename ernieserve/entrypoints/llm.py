"""The offline API, vLLM-shaped: `LLM(model=...).generate(prompts, params)` and `.chat(messages)`."""

from __future__ import annotations

from typing import Any, Sequence

from tqdm import tqdm

from ernieserve.config import EngineArgs
from ernieserve.engine.llm_engine import LLMEngine
from ernieserve.frontend.output_processor import OutputKind
from ernieserve.frontend.processor import PromptType
from ernieserve.multimodal.chat import parse_chat_messages
from ernieserve.outputs import RequestOutput
from ernieserve.sampling_params import SamplingParams


class LLM:
    """Runs the engine core in this process.

    Keyword arguments are EngineArgs fields with vLLM/FastDeploy names (max_model_len,
    max_num_seqs, max_num_batched_tokens, block_size, num_gpu_blocks_override, dtype, device,
    load_format, tensor_parallel_size, ...).
    """

    def __init__(self, model: str | None = None, tokenizer: str | None = None, **engine_kwargs: Any) -> None:
        fields = set(EngineArgs.__dataclass_fields__)
        unknown = sorted(set(engine_kwargs) - fields)
        if unknown:
            raise TypeError(f"LLM() got unknown engine arguments: {', '.join(unknown)}")
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs(model=model, tokenizer=tokenizer, **engine_kwargs))

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.processor.default_sampling_params()

    def model_param_bytes(self) -> int:
        return self.llm_engine.core.model_param_bytes()

    def decode_weight_bytes(self) -> int:
        """Weight bytes a batch-1 decode step reads on one device: MoE models read only the routed
        experts a token picks, so this is the bandwidth floor's numerator, not model_param_bytes."""
        return self.llm_engine.core.decode_weight_bytes()

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        engine = self.llm_engine
        ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                rid = engine.next_request_id()
                engine.add_request(rid, prompt, params, OutputKind.FINAL_ONLY)
                ids.append(rid)
        except Exception:
            for rid in ids:  # leave nothing half-queued behind a bad prompt
                engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        proc = self.llm_engine.processor
        prompts: list[PromptType] = []
        for conv in conversations:
            # content parts: text, image_url, video_url, image_pil (see multimodal/chat.py)
            conv, media = parse_chat_messages(conv, takes_media=proc.mm_processor is not None,
                                              model=proc.model_config.served_model_name)
            text = proc.apply_chat_template(conv, chat_template, add_generation_prompt, **(chat_template_kwargs or {}))
            # the template already holds the special tokens: do not add BOS again
            prompt: dict[str, Any] = {"prompt": text,
                                      "prompt_token_ids": proc.tokenizer.encode(text, add_special_tokens=False)}
            if media:
                images, videos = proc.load_chat_media(media)
                prompt["multi_modal_data"] = {"image": images, "video": videos}
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm or len(ids) < 2, dynamic_ncols=True)
        out_tokens = 0
        with bar:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        out_tokens += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        elapsed = bar.format_dict.get("elapsed") or 0
                        if elapsed:
                            bar.set_postfix_str(f"output {out_tokens / elapsed:.1f} tok/s")
        return [done[rid] for rid in ids]
