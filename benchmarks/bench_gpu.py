"""MART on a GPU: WRN-28-10 training throughput and model FLOP utilisation (MFU) per precision setting.

Measured (only when `torch.cuda.is_available()`; otherwise prints "skipped: no CUDA device"): the
mart stage's loop (`ml.training.train_one_epoch` with the real `MixedBatchLoader`, PGD-10 training attack,
MART loss, SGD; model placed by `ml.devices.prepare_for_training`) on WRN-28-10, batch 128, 32x32x3, for
  fp32                       (cuDNN convolutions in TF32, PyTorch's default)
  bf16                       (run.precision = "bf16")
  bf16+channels_last         (+ run.channels_last)
  bf16+channels_last+compile (+ run.compile: as the stage does it, the two training forwards are
                              compiled, the attack's ten forward+backward passes run eagerly)
  ...+compiled attack        (prototype of the proposed fix: the attack goes through the compiled
                              module too)
and the model FLOP utilisation: images/s x 26 forward-equivalents x 10.5 GFLOP / peak, where one
WRN-28-10 forward at 32x32 is ~5.25 GMAC = 10.5 GFLOP and a MART step costs ~26 forwards (10 attack
steps x (forward + input backward ~ 2) + 2 training forwards + their backward ~ 4). Peaks (dense, TFLOP/s)
come from PEAK_TFLOPS by `torch.cuda.get_device_name()`: bf16 runs against the bf16 peak, fp32 runs
against the TF32 peak; an unknown device prints the achieved TFLOP/s only.

Runtime: default (20 timed batches per setting after 3 warm-up batches) about 3-5 minutes on an H100
(compilation included); --quick (8 batches) about 2 minutes.

Last seen: not yet run on a GPU (this repository's benchmark machine has none).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from benchmarks.common import Comparison, print_comparisons, best_rates, print_header

FORWARD_GFLOP = {"wrn-28-10": 10.5, "wrn-34-10": 12.9, "resnet18": 1.11}  # one 32x32 forward, 2 x MACs
FORWARD_EQUIVALENTS = 26  # per MART step with PGD-10, see the docstring

# (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s, dense TF32 TFLOP/s); first match wins.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.0, 418.0),
    ("GH200", 989.0, 495.0),
    ("H200", 989.0, 495.0),
    ("H100", 989.0, 495.0),   # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L4", 121.0, 60.0),
]

# name -> (precision, channels_last, compile, compiled attack)
SETTINGS = {
    "fp32": ("fp32", False, False, False),
    "bf16": ("bf16", False, False, False),
    "bf16+channels_last": ("bf16", True, False, False),
    "bf16+channels_last+compile": ("bf16", True, True, False),
    "bf16+channels_last+compile+compiled attack": ("bf16", True, True, True),
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    for fragment, bf16, tf32 in PEAK_TFLOPS:
        if fragment in device_name:
            return bf16 if precision in ("bf16", "fp16") else tf32
    return None


def bench_gpu(arch: str = "wrn-28-10", batch_size: int = 128, steps: int = 10, train_steps: int = 20,
              warmup: int = 3, rounds: int = 1, settings: dict | None = None, device: str = "cuda",
              num_labeled: int = 4096, num_pool: int = 8192) -> dict:
    """images/s, TFLOP/s and MFU of the stage's MART loop per setting; {"skipped": why} without CUDA.

    `device="cpu"` with a small arch runs the same code path without a GPU (for the tests)."""
    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    from benchmarks.bench_mart import synthetic_training_data
    from ml.models import build_model

    settings = SETTINGS if settings is None else settings
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    torch.manual_seed(0)
    initial = build_model(arch, num_classes=10, in_channels=3)
    data = synthetic_training_data((32, 32, 3), num_labeled, num_pool)
    gflop_per_image = FORWARD_GFLOP.get(arch, float("nan")) * FORWARD_EQUIVALENTS
    result = {"device": device_name, "arch": arch, "batch_size": batch_size, "pgd_steps": steps,
              "train_steps": train_steps, "gflop_per_image": gflop_per_image, "settings": list(settings)}
    for name, (precision, channels_last, compiled, compiled_attack) in settings.items():
        try:
            result[name] = _measure_setting(initial, data, device, device_name, gflop_per_image, name, precision,
                                            channels_last, compiled, compiled_attack, batch_size=batch_size,
                                            steps=steps, train_steps=train_steps, warmup=warmup, rounds=rounds)
        except Exception as e:  # one failing setting (a compiler error, out of memory) must not hide the others
            result[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def _measure_setting(initial, data, device, device_name, gflop_per_image, name, precision, channels_last, compiled,
                     compiled_attack, *, batch_size, steps, train_steps, warmup, rounds) -> dict:
    from benchmarks.bench_mart import StageLoop

    model = copy.deepcopy(initial)
    attack_model = None
    if compiled_attack:
        model = model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        attack_model = torch.compile(model)
    loop = StageLoop(model, **data, batch_size=batch_size, batches_per_epoch=train_steps, steps=steps,
                     precision=precision, channels_last=channels_last, compile=compiled, device=device,
                     attack_model=attack_model)
    started = time.perf_counter()
    loop.warm_up(warmup)
    if device == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started
    rate = best_rates({name: loop.epoch}, rounds)[name]
    tflops = rate * gflop_per_image / 1e3
    peak = peak_tflops(device_name, precision)
    return {"images_per_s": rate, "tflops": tflops, "peak_tflops": peak, "mfu": tflops / peak if peak else None,
            "warmup_s": warmup_s}


def comparisons(result: dict) -> list[Comparison]:
    """Per setting: its speed-up over fp32, and its MFU (achieved / peak TFLOP/s); informational, no target."""
    if "skipped" in result:
        return []
    rows = []
    baseline = result.get("fp32", {}).get("images_per_s")
    for name in result["settings"]:
        r = result[name]
        if "error" in r:
            continue
        if baseline and name != "fp32":
            rows.append(Comparison("gpu", f"{result['arch']} {name} vs fp32", name, r["images_per_s"], "fp32",
                                   baseline, "img/s", ">=", None, extra=r))
        rows.append(Comparison("gpu", f"{result['arch']} {name} MFU", "achieved", r["tflops"], "peak",
                               r["peak_tflops"] or float("nan"), "TFLOP/s", ">=", None,
                               note=f"{r['images_per_s']:.0f} img/s" + ("" if r["peak_tflops"] else
                                                                          ", peak unknown for this device"),
                               extra=r))
    return rows


def run(quick: bool = False) -> list[Comparison]:
    print_header("gpu: MART on WRN-28-10, images/s and MFU per precision setting")
    result = bench_gpu(train_steps=8 if quick else 20)
    if "skipped" in result:
        print(f"skipped: {result['skipped']}", flush=True)
        return []
    print(f"device: {result['device']}")
    for name in result["settings"]:
        if "error" in result[name]:
            print(f"gpu         {name}: failed: {result[name]['error']}", flush=True)
    return print_comparisons(comparisons(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    run(quick=parser.parse_args().quick)
