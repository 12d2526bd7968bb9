"""The in-process engine of the offline API: input processor -> EngineCore -> output processor."""

from __future__ import annotations

import itertools
import logging
from typing import Any

from ernieserve.config import ConfigError, EngineArgs, EngineConfig
from ernieserve.engine.core import EngineCore
from ernieserve.frontend.output_processor import OutputKind, OutputProcessor, child_request_id
from ernieserve.frontend.processor import InputProcessor, PromptType
from ernieserve.outputs import RequestOutput
from ernieserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        if config.parallel.data_parallel_size > 1 or config.parallel.node_rank > 0:
            raise ConfigError("--data-parallel-size > 1 and --node-rank > 0 are not supported by the offline engine "
                              "(one engine core in this process); use `ernieserve serve`.")
        self.config = config
        self.processor = InputProcessor(config.model)
        self.tokenizer = self.processor.tokenizer
        self.core = EngineCore(config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        return cls(args.create_engine_config())

    def next_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    kind: OutputKind = OutputKind.CUMULATIVE) -> None:
        """Validates, then queues the request (its n samples as n engine requests)."""
        if request_id in self.output_processor.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, engine_req = self.processor.process(request_id, prompt, params)
        self.core.validate(engine_req)
        child_ids = [child_request_id(request_id, i) for i in range(params.n)]
        self.output_processor.add_request(request_id, text, engine_req.prompt_token_ids, params, kind, child_ids,
                                          engine_req.arrival_time)
        full = engine_req.sampling_params  # the processor's copy, with bad_words tokenized
        for i, cid in enumerate(child_ids):
            child = full.clone_for_child(i) if params.n > 1 else full
            self.core.add_request(_replace(engine_req, request_id=cid, sampling_params=child))

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.output_processor.abort_request(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        outputs = self.core.step()
        results, to_abort = self.output_processor.process_outputs(outputs.outputs)
        if to_abort:
            self.core.abort_requests(to_abort)
        return results


def _replace(req: Any, **changes: Any) -> Any:
    import msgspec

    return msgspec.structs.replace(req, **changes)
