"""``ptd eval`` as a library call: the test accuracy of a saved model file on a config's data.

Checks what a training command's preflight checks and scoring uses (threads, the data section,
the device), then that the model fits the data: its channels and classes, the image size it was
trained at, and the order of its classes (each recorded in the file; a mismatch would score it
against relabelled or resized images). Trains nothing and writes nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ptd.config import RunConfig


def evaluate_model_file(cfg: RunConfig, checkpoint: str | Path, device: str | None = None,
                        config_label: str | None = None) -> dict[str, Any]:
    """Score ``checkpoint`` (a .safetensors written by ptd) on ``cfg``'s test split. ``device``:
    overrides ``cfg.device``; ``config_label``: how a refusal names the config (its path).
    Returns {acc, loss, n, input_size: (h, w), params, nonzero}; a one-line PtdError for a model
    that does not fit the data. Sets torch's thread count to ``cfg.threads`` where it names one,
    process-wide, as ``ptd eval`` does."""
    import torch

    from ptd.data import frame_size, load_configured, make_loader
    from ptd.measure import count_nonzero, count_params
    from ptd.preflight import check_data_config, check_device, check_runs, check_threads
    from ptd.train.checkpoint import CheckpointError, check_fits_data, load_model
    from ptd.train.loop import Runtime, evaluate

    check_threads(cfg.threads)
    check_data_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = check_device(device if device is not None else cfg.device)
    model = load_model(checkpoint)
    dc = cfg.data
    splits = load_configured(dc, cfg.seed, check_images="headers")  # eval trains nothing: a damaged image fails in one line
    spec = getattr(model, "ptd_spec", {})
    if (spec.get("in_channels"), spec.get("num_classes")) != (splits.in_channels, splits.num_classes):
        raise CheckpointError(f"{checkpoint}: the model takes {spec.get('in_channels')}-channel images and has {spec.get('num_classes')} "
                              f"classes, but data.name={dc.name} has {splits.in_channels} and {splits.num_classes}; pass the config "
                              f"the model was trained with")
    want = frame_size(splits, dc.image_size)
    check_fits_data(checkpoint, getattr(model, "ptd_input_size", None), getattr(model, "ptd_classes", None),
                    want, splits.classes, config_label or "this config", f"data.name={dc.name}")
    check_runs(model, str(checkpoint), splits, dc.image_size)
    rt = Runtime(device=dev, amp=cfg.amp, channels_last=cfg.channels_last, fast_wgrad=cfg.fast_wgrad, compile=cfg.compile, quiet=True)
    model = rt.prepare(model)
    # At the size checked above (data.image_size): without it a folder split loaded at 224 and an
    # in-memory one at its own size, whatever the config and the output line said.
    loader = make_loader(splits.test, batch_size=cfg.eval_batch_size, train=False, mean=splits.mean, std=splits.std, device=dev,
                         augment=False, channels_last=rt.channels_last, image_size=dc.image_size, workers=dc.workers)
    r = evaluate(model, loader, rt)
    return {**r, "input_size": tuple(want), "params": count_params(model), "nonzero": count_nonzero(model)}
