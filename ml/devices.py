"""Where and in what precision the training stages compute: the device, bf16/fp16 autocast, and the
model's placement for training (channels_last, SyncBN, DDP, torch.compile of the model and of the attack's
forwards, the fp16 loss scaler)."""
from __future__ import annotations

import contextlib
import logging
import os

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware: CUDA (Ampere and later), or a CPU with AVX-512 BF16 or
    AMX. Elsewhere oneDNN emulates bf16 and a training step runs several times slower than in fp32
    (measured 7-9x on a 2-core AVX2 EPYC)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if not _onednn_may_use_bf16():
        return False
    # Private probes (torch 2.x); a torch without them is treated as having no native bf16.
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


def _onednn_may_use_bf16() -> bool:
    """False where ONEDNN_MAX_CPU_ISA (or its old name DNNL_MAX_CPU_ISA) caps oneDNN below AVX-512 BF16: the
    CPU has the instructions but the convolutions will not use them (torch's probes read only the CPU).
    This is also how to run the AVX2-only path on a newer CPU: ONEDNN_MAX_CPU_ISA=AVX2
    ATEN_CPU_CAPABILITY=avx2."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    # oneDNN's names: SSE41, AVX, AVX2, AVX2_VNNI(_2), AVX512_CORE(_VNNI) lack bf16 dot products;
    # AVX512_CORE_BF16, AVX512_CORE_FP16, AVX512_CORE_AMX(_FP16), AVX10_1_512(_AMX(_FP16)), ALL have them.
    return cap in ("ALL", "DEFAULT") or "BF16" in cap or "AMX" in cap or "FP16" in cap or cap.startswith("AVX10")


def resolve_precision(precision: str, device: torch.device) -> str:
    """run.precision "auto" -> "bf16" where it is native, else "fp32"; other values unchanged."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def autocast(device: torch.device, precision: str):
    """Mixed precision for training forwards; fp32 means no autocast at all."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers (attacks and checkpoints use it)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def prepare_for_training(model: nn.Module, *, run_cfg, device: torch.device, distributed: bool):
    """Move the model and wrap it for training: channels_last, SyncBN, DDP, torch.compile, fp16 scaler.

    Returns (train_model, scaler). Attacks and checkpoints go through `unwrap(train_model)`.
    """
    from pipeline.core.errors import UserError

    if run_cfg.precision == "fp16" and device.type != "cuda":
        raise UserError("run.precision = \"fp16\" needs a CUDA device (fp16 on CPU is slow and needs loss "
                        "scaling); use run.precision = \"bf16\" on CPU.")
    if run_cfg.precision == "bf16" and not native_bf16(device):
        _logger.warning("run.precision = \"bf16\" on a device without native bf16 is emulated and slower "
                        "than fp32; run.precision = \"auto\" picks bf16 only where it is native.")
    model = model.to(device)
    if run_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if distributed and run_cfg.sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model = model
    if distributed:
        # MART/TRADES run this wrapper twice (natural, adversarial) before one backward. That is correct
        # with plain DDP: both outputs feed the loss, so every parameter's gradient accumulator runs once
        # per backward (summing both uses) and DDP all-reduces each bucket once; no
        # find_unused_parameters or static_graph needed (tests/distributed checks gradients and weights
        # agree across ranks). Not no_sync() around the natural forward (whether backward syncs follows
        # the last forward, so it changes nothing; it is for gradient accumulation), not one forward of
        # cat([x, x_adv]) (BatchNorm would pool natural and adversarial statistics, unlike the official
        # MART code). forward_sync_buffers=False (torch 2.14's broadcast_buffers=False; buffers still
        # start from rank 0's): train_one_epoch gives every rank rank 0's BatchNorm statistics once per
        # step, before the attack (which runs on the unwrapped module, before any DDP forward could sync
        # them), so all ranks attack the model rank 0 checkpoints and a resumed run repeats an
        # uninterrupted one. DDP's per-forward sync would also rewrite the buffers in place between the
        # two forwards, which breaks backward on cuDNN in torch releases without the fix for
        # pytorch#175024.
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    if run_cfg.compile:
        train_model = torch.compile(train_model)
    # fp16 only: bf16 has fp32's exponent range. On the training device's type (prepare_for_training
    # refuses fp16 elsewhere than CUDA; the CPU scaler exists for tests).
    scaler = torch.amp.GradScaler(device.type) if run_cfg.precision == "fp16" else None
    return train_model, scaler


def attack_forward(model: nn.Module, compile: bool):
    """What the training attack calls for its forwards: the plain module, or with run.compile a compiled
    forward of it that takes the weights as detached inputs.

    The attack only needs the gradient w.r.t. its input. Eager autograd skips the weight gradients by
    itself (only the nodes leading to the input run), but a compiled graph's backward computes the
    gradient of every graph input that requires one, so compiling the module as it is would add the
    weight gradients to each of the attack's steps (about +50% of its backward). Detached views share the
    weights' storage, so the forward sees the current weights without copying them.
    """
    if not compile:
        return model
    compiled = torch.compile(lambda tensors, x: torch.func.functional_call(model, tensors, (x,)))

    def forward(x: torch.Tensor) -> torch.Tensor:
        tensors = {name: t.detach() for name, t in (*model.named_parameters(), *model.named_buffers())}
        return compiled(tensors, x)

    return forward
