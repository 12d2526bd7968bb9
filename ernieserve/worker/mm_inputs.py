"""The runner's side of multimodal prompts: 3-D positions, the encoder cache, splicing vision rows.

A multimodal request's prompt holds runs of placeholder tokens (`MultiModalItem`, one per image
or video). When a step schedules tokens of a run, the runner needs that item's encoder output
(`model.embed_multimodal`): it is computed once, for all items first needed in the step in one
batched vision forward, and kept in the `EncoderCache` (keyed by content hash, so two requests
with the same image share it) while a live request still refers to it. The step's token
embeddings then get the rows of the scheduled part of each run, so chunked prefill can stop in the
middle of an image.

Models with 3-D rotary (`uses_mrope`) take positions [3, T]: a prompt token's column comes from
the table `model.get_mrope_positions` gave when the request arrived, a generated token at
sequence index p gets p + delta in all three rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ernieserve.multimodal.inputs import MultiModalItem
from ernieserve.worker.input_batch import CachedRequestState, StepInputs


def mrope_positions(states: dict[str, CachedRequestState], step: StepInputs) -> np.ndarray:
    """[3, num_tokens] int64 positions of the step, request by request."""
    out = np.empty((3, len(step.positions)), dtype=np.int64)
    for i, rid in enumerate(step.req_ids):
        lo, hi = int(step.query_start_loc[i]), int(step.query_start_loc[i + 1])
        seq = step.positions[lo:hi]  # sequence indexes
        st = states[rid]
        table = st.mrope_positions
        if table is None:  # a text-only request: plain positions in all three rows
            out[:, lo:hi] = seq
            continue
        n_prompt = table.shape[1]
        in_prompt = seq < n_prompt
        out[:, lo:hi] = seq + st.mrope_delta
        if in_prompt.any():
            out[:, lo:hi][:, in_prompt] = table[:, seq[in_prompt]]
    return out


@dataclass(slots=True)
class Splice:
    """Rows [item_lo, item_hi) of an item's encoder output go to step token rows from `row`."""

    item: MultiModalItem
    item_lo: int
    item_hi: int
    row: int


def splices_of_step(states: dict[str, CachedRequestState], step: StepInputs) -> list[Splice]:
    """The parts of placeholder runs that this step computes."""
    out: list[Splice] = []
    for i, rid in enumerate(step.req_ids):
        st = states[rid]
        if not st.mm_items:
            continue
        lo = int(step.query_start_loc[i])
        start = int(step.positions[lo])
        end = start + int(step.query_start_loc[i + 1]) - lo
        for item in st.mm_items:
            a, b = max(start, item.offset), min(end, item.end)
            if a < b:
                out.append(Splice(item, a - item.offset, b - item.offset, lo + a - start))
    return out


class EncoderCache:
    """Encoder outputs by item hash, kept while some live request has that item."""

    def __init__(self) -> None:
        self._outputs: dict[str, torch.Tensor] = {}  # hash -> [item.length, hidden]
        self._holders: dict[str, set[str]] = {}  # hash -> ids of live requests with the item

    def __len__(self) -> int:
        return len(self._outputs)

    def add_request(self, request_id: str, items: list[MultiModalItem]) -> None:
        for item in items:
            self._holders.setdefault(item.hash, set()).add(request_id)

    def remove_request(self, request_id: str, items: list[MultiModalItem]) -> None:
        for item in items:
            holders = self._holders.get(item.hash)
            if holders is None:
                continue
            holders.discard(request_id)
            if not holders:
                del self._holders[item.hash]
                self._outputs.pop(item.hash, None)

    def ensure(self, model: torch.nn.Module, splices: list[Splice]) -> None:
        """Encode, in one batched call, the items of `splices` not in the cache yet."""
        missing: dict[str, MultiModalItem] = {}
        for s in splices:
            if s.item.hash not in self._outputs:
                missing.setdefault(s.item.hash, s.item)
        if not missing:
            return
        items = list(missing.values())
        outputs = model.embed_multimodal(items)  # type: ignore[operator]
        for item, rows in zip(items, outputs):
            if rows.shape[0] != item.length:
                raise ValueError(f"the encoder gave {rows.shape[0]} rows for a run of {item.length} placeholders")
            self._outputs[item.hash] = rows

    def splice(self, embeds: torch.Tensor, splices: list[Splice]) -> None:
        """Writes the scheduled encoder rows into the step's token embeddings [T, hidden], in place."""
        rows = torch.cat([self._outputs[s.item.hash][s.item_lo:s.item_hi] for s in splices])
        index = np.concatenate([np.arange(s.row, s.row + s.item_hi - s.item_lo) for s in splices])
        embeds.index_copy_(0, torch.from_numpy(index).to(embeds.device, non_blocking=True), rows.to(embeds.dtype))
