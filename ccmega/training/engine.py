"""The training step on megatron-core, shared by pretraining, ICAE fine-tuning and the tests.

`build_training_setup` wraps model chunks in megatron DDP and builds the megatron optimizer;
`train_step` runs one global batch through `get_forward_backward_func` (micro-batches, pipeline
schedule), finalises gradients (DP reduce-scatter/all-reduce, tied-embedding sync across stages),
clips and steps. What a model computes per micro-batch is the caller's `forward_step`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import torch


@dataclass
class TrainingSetup:
    model: list  # megatron DDP-wrapped chunks (one per virtual pipeline stage; one here)
    optimizer: object  # megatron MegatronOptimizer (distributed or not)
    config: object  # the TransformerConfig driving the schedule


def build_training_setup(
    modules: list[torch.nn.Module],
    config,
    lr: float,
    min_lr: float = 0.0,
    weight_decay: float = 0.1,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.95,
    adam_eps: float = 1e-8,
    clip_grad: float = 1.0,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
) -> TrainingSetup:
    """Wrap `modules` (this rank's model chunks) in megatron DDP and build AdamW over the parameters
    that require grad; frozen parameters stay outside DDP buckets and the optimizer. With the overlap
    switches, the schedule and the hooks are wired as Megatron-LM's training setup wires them."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    model = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=m,
                                disable_bucketing=(i > 0))
        for i, m in enumerate(modules)
    ]
    for m in model:
        m.broadcast_params()  # identical DP replicas even if initialisation differed
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        adam_eps=adam_eps,
        clip_grad=clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = _per_chunk([m.no_sync for m in model])
    if overlap_grad_reduce:  # each stage starts its reduction when its last micro-batch's backward ends
        config.grad_sync_func = _per_chunk([m.start_grad_sync for m in model])
    return TrainingSetup(model=model, optimizer=optimizer, config=config)


def _per_chunk(functions: list):
    return functions[0] if len(functions) == 1 else functions


def gather_params(setup: TrainingSetup) -> None:
    """With the parameter all-gather overlapped (speed.overlap_param_gather), each rank's model holds only its
    own shard of the updated parameters until the next forward pass gathers the rest (a validation pass
    does); a checkpoint must gather them first, as Megatron-LM does before it saves."""
    for m in setup.model:
        if m.ddp_config.overlap_param_gather:
            m.start_param_sync(force_sync=True)


# ---- language-model loss -----------------------------------------------------------------------------

def masked_lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Mean token loss of a micro-batch; the schedule divides by the number of micro-batches."""
    loss_mask = loss_mask.float()
    loss = (per_token_loss.float() * loss_mask).sum() / loss_mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"lm loss": loss.detach().clone()}


def gpt_forward_step(data_iterator: Iterator, model):
    """Forward one micro-batch of {tokens, labels, loss_mask[, position_ids, attention_mask]}."""
    batch = next(data_iterator)
    tokens = batch["tokens"]
    positions = batch.get("position_ids")
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    output = model(tokens, positions, batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(masked_lm_loss, batch["loss_mask"])


# ---- one step -------------------------------------------------------------------------------------------

@dataclass
class StepResult:
    loss: float  # mean over the global batch; NaN off the last pipeline stage before broadcast
    grad_norm: float
    update_successful: bool


def _reduced_losses(losses: list[dict], key: str) -> float:
    """Mean of the micro-batch losses on the last stage, averaged over DP ranks and broadcast to all."""
    from megatron.core import parallel_state as ps

    from ccmega.runtime import device

    value = torch.zeros(1, dtype=torch.float64, device=device())  # NCCL reduces device tensors only
    if ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
        value[0] = torch.stack([d[key].double() for d in losses]).mean()
        torch.distributed.all_reduce(value, group=ps.get_data_parallel_group())
        value /= ps.get_data_parallel_world_size()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        last = ps.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(value, src=last, group=ps.get_pipeline_model_parallel_group())
    return float(value[0])


def train_step(
    setup: TrainingSetup,
    data_iterator: Iterator,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_step: Callable = gpt_forward_step,
    loss_key: str = "lm loss",
    skip_non_finite_loss: bool = False,
) -> StepResult:
    """One optimizer step over `num_microbatches` micro-batches. With `skip_non_finite_loss`, a NaN/inf
    global loss (the same value on every rank) leaves parameters and optimizer state untouched and
    returns update_successful=False: bf16/fp32 megatron optimizers have no loss scaler to skip it."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for m in setup.model:
        m.zero_grad_buffer()
    setup.optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=setup.model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    loss = _reduced_losses(losses, loss_key)
    if skip_non_finite_loss and not math.isfinite(loss):
        return StepResult(loss=loss, grad_norm=float("nan"), update_successful=False)
    update_successful, grad_norm, _ = setup.optimizer.step()
    return StepResult(loss=loss,
                      grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                      update_successful=bool(update_successful))


def evaluate_loss(setup: TrainingSetup, data_iterator: Iterator, num_microbatches: int, seq_length: int,
                  micro_batch_size: int, forward_step: Callable = gpt_forward_step,
                  loss_key: str = "lm loss") -> float:
    """Mean loss over `num_microbatches` micro-batches without updating anything."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for m in setup.model:
        m.eval()
    with torch.no_grad():
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data_iterator, model=setup.model,
            num_microbatches=num_microbatches, seq_length=seq_length,
            micro_batch_size=micro_batch_size, forward_only=True)
    for m in setup.model:
        m.train()
    return _reduced_losses(losses, loss_key)
