"""Extraction from WebDataset tar shards vs the same JPEGs as a folder, and from a local S3
server (moto, when installed): images/s and the share of the loop spent waiting for data.

    PYTHONPATH=. python benchmarks/webdataset_sources.py            # 2,000 JPEGs, 4 shards
    PYTHONPATH=. python benchmarks/webdataset_sources.py --quick    # 64 tiny JPEGs

The three sources are measured round by round, alternating (``common.rounds_of``). "waiting"
is the time the loop blocks on the DataLoader for the next batch, over the loop's time: near
0 when the loader workers keep ahead of the model. Target (issue #15): local shards within
5% of the folder.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    base_parser,
    busy_note,
    extract_config,
    jpeg_folder,
    machine_line,
    others,
    pick,
    resolve_device,
    rounds_of,
    table,
    write_json,
)

BUCKET = "transferlab-bench"


def make_shards(folder: Path, out: Path, shards: int) -> str:
    """The folder's images as ``shards`` tar shards (sorted keys, .cls labels), cached."""
    files = sorted(p for p in folder.rglob("*.jpg"))
    per = -(-len(files) // shards)
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        path = out / f"train-{s:06d}.tar"
        if path.exists():
            continue
        with tarfile.open(f"{path}.part", "w") as tar:
            for f in files[s * per:(s + 1) * per]:
                key = f.relative_to(folder).as_posix()
                tar.add(f, arcname=key)
                label = out / "label.tmp"
                label.write_text(key.split("/")[0].removeprefix("class"))
                tar.add(label, arcname=key.rsplit(".", 1)[0] + ".cls")
        os.replace(f"{path}.part", path)
    return str(out / f"train-{{000000..{shards - 1:06d}}}.tar")


@contextlib.contextmanager
def s3_copy(shards_dir: Path) -> Iterator[str | None]:
    """The shards uploaded to a moto server on 127.0.0.1 (None without moto and s3fs)."""
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = dict(os.environ)
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        fs.put([str(p) for p in sorted(shards_dir.glob("*.tar"))], f"{BUCKET}/shards/")
        yield f"s3://{BUCKET}/shards"
    finally:
        os.environ.clear()
        os.environ.update(saved)
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


class WaitClock:
    """Wraps extraction's loader to add up the time spent waiting for batches."""

    def __init__(self) -> None:
        from transferlab.extract import runner as run

        self.run, self.waited, self.original = run, 0.0, run.build_loader

    def __enter__(self) -> WaitClock:
        self.run.build_loader = self._build
        return self

    def __exit__(self, *exc: object) -> None:
        self.run.build_loader = self.original

    def _build(self, *args: Any, **kwargs: Any) -> Any:
        loader, prepare = self.original(*args, **kwargs)
        return self._timed(loader), prepare

    def _timed(self, loader: Any) -> Iterator[Any]:
        it = iter(loader)
        while True:
            started = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - started
            yield batch


def case(clock: WaitClock, cfg: Any):
    def go() -> tuple[float, Any]:
        import shutil

        from transferlab.extract.runner import run_extract

        shutil.rmtree(cfg.output.dir, ignore_errors=True)
        clock.waited = 0.0
        result = run_extract(cfg)
        return result.images_per_second, clock.waited / max(result.loop_seconds, 1e-9)
    return go


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    count = args.images or (64 if args.quick else 2000)
    size = (64, 48) if args.quick else (320, 240)
    model = "test_resnet" if args.quick else "resnet18"
    bench = Path(args.bench_dir)
    folder = jpeg_folder(bench, count, size)
    urls = make_shards(folder, bench / f"wds_{folder.name}_{args.shards}", args.shards)
    extra = [f"runtime.device={device.type}", f"runtime.num_workers={args.workers}",
             "runtime.batch_size=32", "preprocess.input_size=[112,112]"]
    wds = ["data.source=webdataset", "data.label_key=cls"]
    with WaitClock() as clock, s3_copy(Path(urls).parent) as s3:
        cases = {
            "folder": extract_config(folder, bench / "wds_out_folder", model, extra),
            "tar shards": extract_config(folder, bench / "wds_out_tar", model,
                                         [*extra, *wds, f"data.urls={urls}"])}
        if s3 is not None:
            cases["tar shards on S3 (moto)"] = extract_config(
                folder, bench / "wds_out_s3", model,
                [*extra, *wds, f"data.urls={s3}/{Path(urls).name}"])
        results = rounds_of({n: case(clock, c) for n, c in cases.items()}, args.rounds)
    best = {name: pick(samples) for name, samples in results.items()}
    ref = best["folder"].value
    rows = [[name, s.value, s.value / ref, f"{100 * s.extra:.1f}%", others(s)]
            for name, s in best.items()]
    print(machine_line(device))
    print(f"{count} JPEGs {size[0]}x{size[1]}, {args.shards} shards, {model}, "
          f"{args.workers} loader workers, batch 32; {busy_note()}")
    print(table("Extraction by data source", ["source", "images/s", "vs folder",
                                               "waiting for data", "others %"], rows))
    payload = {name: {"images_per_second": s.value, "waiting": s.extra}
               for name, s in best.items()}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
