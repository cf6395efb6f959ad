"""Tensor parallelism: one model over a `torch.distributed` group, each layer split across its ranks.

Megatron's split, as vLLM's `--tensor-parallel-size` does it: q/k/v and gate/up are column-parallel (each
rank computes its share of the heads and of the MLP's width, so attention runs on its own heads and its own
KV cache of `num_kv_heads / world_size` heads), o_proj and down_proj are row-parallel (each rank multiplies
its slice of the input features, then one all-reduce sums the ranks' parts). Two all-reduces a layer, and
every rank holds the same hidden states between layers. Embeddings, norms and `lm_head` are replicated.

Only rank 0 runs an engine (scheduler, block tables, sampler). Each step it broadcasts the packed step to
the other ranks, which run the same forward over their shards (`follow`): the same collectives in the same
order. CUDA graphs are not captured under tensor parallelism yet: a step is eager on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from worker.engine.paged.attention import HeadShape
from worker.engine.paged.step_inputs import StepInputs

LEADER = 0


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group (torch.distributed already initialised)."""

    rank: int
    world_size: int
    group: Any = None  # a torch.distributed ProcessGroup; None: the default group

    @classmethod
    def of_default_group(cls) -> "TensorParallel":
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_leader(self) -> bool:
        return self.rank == LEADER

    def heads(self, heads: HeadShape) -> HeadShape:
        """This rank's share of the attention heads; ValueError unless every rank gets whole heads."""
        if heads.num_heads % self.world_size or heads.num_kv_heads % self.world_size:
            raise ValueError(f"tensor parallelism over {self.world_size} ranks needs the {heads.num_heads} query and "
                             f"{heads.num_kv_heads} key/value heads divisible by {self.world_size}")
        return HeadShape(heads.num_heads // self.world_size, heads.num_kv_heads // self.world_size, heads.head_dim)

    def split_outputs(self, linear: nn.Linear, part_sizes: list[int]) -> nn.Linear:
        """Column-parallel: of a fused layer whose outputs are parts of `part_sizes` side by side, this rank's
        slice of each part, still side by side."""
        if any(size % self.world_size for size in part_sizes):
            raise ValueError(f"tensor parallelism over {self.world_size} ranks needs output widths {part_sizes} "
                             f"divisible by {self.world_size}")
        rows, start = [], 0
        for size in part_sizes:
            share = size // self.world_size
            rows.append(torch.arange(start + self.rank * share, start + (self.rank + 1) * share))
            start += size
        index = torch.cat(rows).to(linear.weight.device)
        return _linear(linear.weight[index], None if linear.bias is None else linear.bias[index])

    def split_inputs(self, linear: nn.Linear) -> nn.Linear:
        """Row-parallel: this rank's slice of the input features; the bias stays on the leader only, so that
        the all-reduce adds it once."""
        if linear.in_features % self.world_size:
            raise ValueError(f"tensor parallelism over {self.world_size} ranks needs {linear.in_features} input "
                             f"features divisible by {self.world_size}")
        share = linear.in_features // self.world_size
        bias = linear.bias if self.is_leader else None
        return _linear(linear.weight[:, self.rank * share:(self.rank + 1) * share], bias)

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `partial` (in place)."""
        dist.all_reduce(partial, group=self.group)
        return partial

    def agree_on_min(self, value: int) -> int:
        """The smallest `value` any rank has (e.g. KV blocks: every rank must hold the same block tables)."""
        device = "cuda" if dist.get_backend(self.group) == "nccl" else "cpu"
        tensor = torch.tensor([value], dtype=torch.long, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.group)
        return int(tensor.item())

    def send_step(self, inputs: StepInputs | None) -> None:
        """Leader: hand the next step (None: stop) to the other ranks."""
        payload = None if inputs is None else (inputs.host_tokens, inputs.qo_indptr, inputs.kv_lens,
                                               inputs.kv_indptr, inputs.kv_indices, inputs.kv_last_page_len,
                                               inputs.is_decode_only)
        dist.broadcast_object_list([payload], src=LEADER, group=self.group)

    def receive_step(self, device: torch.device) -> StepInputs | None:
        """Follower: the step the leader sent (None: stop)."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=LEADER, group=self.group)
        if box[0] is None:
            return None
        host_tokens, qo_indptr, kv_lens, kv_indptr, kv_indices, kv_last_page_len, is_decode_only = box[0]
        packed = host_tokens.to(device, non_blocking=True)
        return StepInputs(input_ids=packed[0], positions=packed[1], slot_mapping=packed[2], host_tokens=host_tokens,
                          logits_indices=torch.empty(0, dtype=torch.long, device=device), sample_rows=[],
                          qo_indptr=qo_indptr, kv_lens=kv_lens, kv_indptr=kv_indptr, kv_indices=kv_indices,
                          kv_last_page_len=kv_last_page_len, is_decode_only=is_decode_only)


def join_group() -> TensorParallel:
    """Join the group torch.distributed's environment variables describe (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT): NCCL over this process's one visible GPU, gloo on a CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(0)  # the launcher pins each rank to its GPU with CUDA_VISIBLE_DEVICES
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return TensorParallel.of_default_group()


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@torch.inference_mode()
def follow(model: nn.Module, attention: Any, tp: TensorParallel) -> int:
    """A follower rank's loop: run the forward of every step the leader sends, until it sends stop.
    Returns the number of steps run."""
    steps = 0
    while (inputs := tp.receive_step(model.device)) is not None:
        model(inputs.input_ids, inputs.positions, attention.plan(inputs))
        steps += 1
    return steps
