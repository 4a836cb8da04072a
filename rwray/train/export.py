"""The validation-selected network as a standalone model for serving: uint8 images in, class probabilities out.

After training, the driver builds it from the best checkpoint (the weights of the epoch chosen on validation; with
``train.ema_decay``, the moving average, which is what was evaluated and selected) for `rwray.tracking.model` to log
as an MLflow model. Normalisation is part of the module, so whoever serves it feeds images as the shards hold them:

- array shards: ``[N, C, H, W]`` uint8, a shard's ``image`` rows (``C*H*W`` bytes each, CHW) reshaped;
- encoded (JPEG) shards: ``[N, 3, S, S]`` uint8, the evaluation crop the workers feed the network (shorter side
  resized to ``data.eval_resize``, centre crop of ``data.crop_size``: `rwray.data.decode`). Decoding stays the
  caller's: JPEGs of different sizes do not stack into one array, and the crop is what the model was scored on.

Plain torch: no Ray, no MLflow.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from rwray.config import Config
from rwray.data import Manifest
from rwray.datainfo import DataInfo
from rwray.models import MODELS
from rwray.train.decoupled import prepare_stage


class Probabilities(nn.Module):
    """``net`` behind the workers' input transform and a softmax: uint8 images [N, C, H, W] -> probabilities
    [N, K] (float32; column k is the manifest's class k)."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.net = net
        # [1, C, 1, 1]: the train split's per-channel statistics from the manifest, as buffers so the exported graph
        # carries them.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The same operations, in the same order, as the workers' `Images` (decode: /255, then normalize), so the
        # served predictions are the evaluated ones.
        x = (images.float() / 255.0 - self.mean) / self.std  # [N, C, H, W] float32
        return torch.softmax(self.net(x).float(), dim=1)  # [N, K]


def selected_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network weights a checkpoint's scores were measured on: the EMA's where the run kept one (an
    `AveragedModel` state: the averaged network's keys under ``module.``, plus its ``n_averaged`` counter), else
    the model's."""
    if "ema" in state:
        return {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    return state["model"]


def selected_network(cfg: Config, manifest: Manifest, state: dict[str, Any]) -> Probabilities:
    """The job's network, built as the workers build it (model, then the second-stage head where
    ``train.trainable`` changes it), with the checkpoint's selected weights, in eval mode."""
    info: DataInfo = manifest.data_info(cfg.data.crop_size)
    # init_from / reinit only set weights, which the checkpoint's replace: the architecture is what matters here.
    net = prepare_stage(MODELS.build(cfg.model, info), info.num_classes, None, cfg.train.trainable, False)
    net.load_state_dict(selected_weights(state))
    return Probabilities(net, manifest.mean, manifest.std).eval()


def input_shape(cfg: Config, manifest: Manifest) -> tuple[int, int, int]:
    """(C, H, W) of one served image: the stored shape (array shards) or the evaluation crop (encoded shards)."""
    return manifest.data_info(cfg.data.crop_size).image_shape


def example_images(cfg: Config, manifest: Manifest, n: int = 2) -> np.ndarray:
    """The first ``n`` validation images in the served input format: [n, C, H, W] uint8. (n >= 2: torch.export
    would fix a batch dimension of 1 in the exported graph.)"""
    import pyarrow.parquet as pq

    from rwray.train.batches import column_values

    table = pq.ParquetFile(manifest.shard_paths("val")[0]).read_row_group(0, columns=["image", "index"])
    table = table.slice(0, n)
    if manifest.encoded:
        from rwray.data.decode import Decoder, ImageTransform

        decode = Decoder(ImageTransform(cfg.data.crop_size, cfg.data.eval_resize, "none"), train=False)
        return decode(table.column("image").to_pylist(), column_values(table.column("index")), cfg.train.seed, 0)
    rows = column_values(table.column("image"))  # [n, C*H*W] uint8, maybe a read-only view on Arrow's buffers
    return np.array(rows.reshape(len(rows), *manifest.image_shape))  # a writable copy: torch.export wraps it


def describe(cfg: Config, manifest: Manifest, state: dict[str, Any]) -> dict[str, Any]:
    """What a user of the served model needs beside the graph (the MLflow model's metadata): the class of each
    output column, the input format and normalisation, the architecture, and which epoch was selected and why."""
    c, h, w = input_shape(cfg, manifest)
    best = state["best"]
    return {
        "classes": manifest.classes,  # output column k is classes[k]
        "class_counts": manifest.class_counts("train"),  # training samples per class: many / medium / few-shot groups
        "input": {"dtype": "uint8", "shape": [-1, c, h, w], "layout": "NCHW",
                  "images": (f"evaluation crops: shorter side resized to {cfg.data.eval_resize}, centre crop "
                             f"{cfg.data.crop_size} (RGB)" if manifest.encoded else "shard image rows reshaped")},
        # encoded images: (crop_size, eval_resize) of the evaluation crop the model takes (`rwray evaluate` decodes so)
        "eval_crop": [cfg.data.crop_size, cfg.data.eval_resize] if manifest.encoded else None,
        "output": {"dtype": "float32", "shape": [-1, manifest.num_classes], "values": "class probabilities"},
        "normalisation": {"mean": manifest.mean, "std": manifest.std, "scale": 1 / 255},  # inside the model
        "model": cfg.model.model_dump(mode="json"),
        "trainable": cfg.train.trainable,
        "weights": "ema" if "ema" in state else "model",
        "select_metric": cfg.train.select_metric,
        "select_value": float(best["score"]),
        "epoch": int(best["epoch"]),  # 0-based, as the MLflow metrics' steps
        "data_manifest_sha256": manifest.sha256,
    }
