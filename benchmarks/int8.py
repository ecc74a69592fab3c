"""int8 through ONNX Runtime's static quantization (issue #30 item 4): does it pay here?

    PYTHONPATH=. python benchmarks/int8.py               # resnet50 @224 and the MNIST split
    PYTHONPATH=. python benchmarks/int8.py --quick

1. resnet50 @224 (timm random weights, photo-like generated images): transferlab's eager
   engine (fp32 and bf16 autocast, BatchNorm folded, channels_last), the model's ONNX graph
   (``models.backends.export_onnx``, what ``runtime.backend=onnxruntime`` runs) in fp32, and
   that graph quantised to int8 by ``onnxruntime.quantization.quantize_static`` (QDQ,
   per-channel int8 weights, uint8 activations, MinMax calibration on the first
   ``--calibration`` images of the run). Alternated rounds, median img/s; the cosine of each
   int8 row to its fp32 row (median and smallest).
2. The MNIST split (configs/mnist_split.yaml, bundled 5,000 digits): LeNet trained on digits
   0-4 (a few epochs), its 800-d ``first:7`` features of digits 5-9 in fp32 and int8
   (calibrated on the first training images), the logistic probe (``analysis.linear_probe``)
   trained on the training digits and scored on the test digits: the accuracy of each.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import base_parser, machine_line, median, structured_image, table, write_json


def quantize_int8(onnx_bytes: bytes, calibration: np.ndarray, form: str = "QDQ") -> bytes:
    """``onnx_bytes`` quantised statically (``form``: QDQ or QOperator, per-channel) on
    ``calibration`` (N, C, H, W) float32 inputs of the graph."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": calibration[i:i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        raw, src, dst = (Path(tmp) / f"{n}.onnx" for n in ("raw", "fp32", "int8"))
        raw.write_bytes(onnx_bytes)
        # ONNX Runtime's recommended pre-processing: shape inference and graph optimisation
        # (folds the exporter's bias Constants into initializers the quantiser needs)
        quant_pre_process(str(raw), str(src), skip_symbolic_shape=True)
        quantize_static(str(src), str(dst), Reader(), quant_format=getattr(QuantFormat, form),
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8)
        return dst.read_bytes()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def photo_batch(n: int, size: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    imgs = [np.asarray(structured_image(rng, (size, size)).convert("RGB")) for _ in range(n)]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def resnet_part(name: str, size: int, batch: int, batches: int, rounds: int, calib: int,
                threads: int) -> dict[str, Any]:
    from transferlab.models.backends import OnnxRuntimeGraph, export_onnx
    from transferlab.models.engine import FeatureComputer
    from transferlab.models.extractor import build_extractor
    from transferlab.runtime.device import Runtime, apply_runtime

    torch.manual_seed(0)
    built = build_extractor(name, cut="head", preprocess={"input_size": [3, size, size]})
    rt = Runtime(torch.device("cpu"), "fp32", True, 0, threads, True)
    apply_runtime(rt)  # as extraction: threads, glibc malloc tuned
    eager = {p: FeatureComputer(built.extractor, built.spec, Runtime(
        torch.device("cpu"), p, True, 0, threads, True), fold_bn=True) for p in ("fp32", "bf16")}
    folded = eager["fp32"].model.to(memory_format=torch.contiguous_format)
    calibration_images = photo_batch(calib, size, 1)  # "the first images of the run"
    test_images = photo_batch(batch, size, 2)
    norm = eager["fp32"].normalize
    started = time.perf_counter()
    fp32_graph = export_onnx(folded, tuple(built.spec.input_size))
    export_s = time.perf_counter() - started
    started = time.perf_counter()
    calibration = norm(calibration_images).numpy()
    int8_graphs = {form: quantize_int8(fp32_graph, calibration, form)
                   for form in ("QDQ", "QOperator")}
    quant_s = (time.perf_counter() - started) / 2
    ort = {"onnxruntime fp32": OnnxRuntimeGraph(fp32_graph, threads),
           **{f"onnxruntime int8 ({form})": OnnxRuntimeGraph(g, threads)
              for form, g in int8_graphs.items()}}
    x = norm(test_images)
    runs = {"eager fp32": lambda: eager["fp32"](test_images)[0],
            "eager bf16": lambda: eager["bf16"](test_images)[0],
            **{k: (lambda g=g: g(x)[0].numpy()) for k, g in ort.items()}}
    rows = {k: f() for k, f in runs.items()}
    speeds: dict[str, list[float]] = {k: [] for k in runs}
    labels = list(runs)
    for r in range(rounds):
        for k in labels[r % len(labels):] + labels[:r % len(labels)]:
            runs[k]()
            t = time.perf_counter()
            for _ in range(batches):
                runs[k]()
            speeds[k].append(batch * batches / (time.perf_counter() - t))
    ref = rows["eager fp32"]
    return {"export_s": export_s, "quantize_s": quant_s, "rt": rt.precision,
            "variants": {k: {"rounds": speeds[k], "median": median(speeds[k]),
                             "cos_median": float(np.median(cosines(rows[k], ref))),
                             "cos_min": float(cosines(rows[k], ref).min())} for k in labels}}


def mnist_part(epochs: int, calib: int, threads: int) -> dict[str, Any]:
    from transferlab.analysis.linear_probe import fit_logistic
    from transferlab.data.sources import MNIST_5K, mnist_5k_split
    from transferlab.models.backends import OnnxRuntimeGraph, export_onnx
    from transferlab.models.lenet import lenet

    with np.load(MNIST_5K) as data:
        images, labels = data["images"], data["labels"].astype(np.int64)
    train_rows, test_rows = mnist_5k_split(labels, "train"), mnist_5k_split(labels, "test")
    x = torch.from_numpy(images).float().unsqueeze(1) / 255.0
    y = torch.from_numpy(labels)
    torch.manual_seed(0)
    net = lenet(5)
    source = torch.from_numpy(train_rows[labels[train_rows] < 5])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):  # pretrain on digits 0-4
        for i in torch.randperm(len(source)).split(64):
            rows = source[i]
            loss = torch.nn.functional.cross_entropy(net(x[rows]), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    base = net[:7].eval()
    target_train = train_rows[labels[train_rows] >= 5]
    target_test = test_rows[labels[test_rows] >= 5]
    graph = export_onnx(base, (1, 28, 28))
    fp32, int8 = OnnxRuntimeGraph(graph, threads), OnnxRuntimeGraph(
        quantize_int8(graph, x[target_train[:calib]].numpy()), threads)
    out = {}
    for name, g in (("fp32", fp32), ("int8", int8)):
        tr = torch.cat([g(x[target_train[i:i + 256]])[0] for i in range(0, len(target_train),
                                                                          256)]).numpy()
        te = g(x[target_test])[0].numpy()
        probe = fit_logistic(tr, labels[target_train], device="cpu")
        out[name] = {"train": tr, "test": te,
                     "acc": float(np.mean(probe.predict(te).numpy() == labels[target_test]))}
    cos = cosines(out["int8"]["test"], out["fp32"]["test"])
    return {"fp32_acc": out["fp32"]["acc"], "int8_acc": out["int8"]["acc"],
            "cos_median": float(np.median(cos)), "cos_min": float(cos.min()),
            "train": len(target_train), "test": len(target_test), "calibration": calib}


def main(argv: list[str] | None = None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--calibration", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    from transferlab.runtime.cores import usable_cores

    threads = args.threads or usable_cores(False)
    torch.set_num_threads(threads)
    name, size, rounds, batches, batch, epochs = "resnet50", 224, args.rounds, args.batches, \
        args.batch, 3
    if args.quick:
        name, size, rounds, batches, batch, epochs = "test_resnet", 64, 1, 1, 4, 1
    print(machine_line(torch.device("cpu")) + f"; {threads} threads; shared machine")
    res = resnet_part(name, size, batch, batches, rounds, args.calibration, threads)
    print(table(f"{name} @{size}, batch {batch}: int8 (ONNX Runtime static quantization)",
                ["variant", "img/s per round", "median", "cosine to eager fp32 (median)",
                 "smallest cosine"],
                [[k, " ".join(f"{s:.1f}" for s in v["rounds"]), f"{v['median']:.1f}",
                  f"{v['cos_median']:.5f}", f"{v['cos_min']:.5f}"]
                 for k, v in res["variants"].items()]))
    print(f"export {res['export_s']:.1f} s, quantisation {res['quantize_s']:.1f} s "
          f"({args.calibration} calibration images)")
    mn = mnist_part(epochs, args.calibration, threads)
    print(table("MNIST split: LeNet first:7 features of digits 5-9, logistic probe",
                ["precision", "probe test accuracy", "cosine int8/fp32 (median)",
                 "smallest cosine"],
                [["fp32", f"{mn['fp32_acc']:.4f}", "-", "-"],
                 ["int8", f"{mn['int8_acc']:.4f}", f"{mn['cos_median']:.5f}",
                  f"{mn['cos_min']:.5f}"]]))
    results = {"resnet": res, "mnist": mn}
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
