"""Stores stay byte for byte what the code before the one-engine reshaping (#23) wrote.

``EXPECTED`` holds, per case, the SHA-256 of every file of the store (tmp paths replaced,
``.npz`` files by their arrays: the zip members carry a time stamp) and of every
``meta.json`` field but the time and library versions, as written by the previous runner
(``run_extract`` / ``run_multi_extract``). Regenerate with the old code on the path::

    PYTHONPATH=/path/to/old/checkout python tests/test_extract_bytes.py

The digests hold for the machine arithmetic they were taken on: ``CANARY`` digests
test_resnet's plain forward pass and a PIL resize, outside transferlab; where they differ,
this machine rounds otherwise and the store digests cannot be compared (skip, not fail).
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

if __name__ == "__main__":  # run as a script: the checkout on PYTHONPATH is the one recorded
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from tests.imagegen import random_image, save
from transferlab.config import ExtractConfig, load_config
from transferlab.extract.run import run_extract

CUTS = "model.cut=[stage:0, stage:2, head]"
CASES = {
    "head": [],  # BatchNorm folded
    "stage1-srp-views": ["model.cut=stage:1", "output.reduce=srp:8", "output.views=1"],
    "head-list": ["model.cut=[head]"],
    "cuts3": [CUTS],
    "cuts3-pca": [CUTS, "output.reduce=pca:4"],
    "cuts2-srp-mean": ["model.cut=[stage:0, head]", "output.reduce=srp:16", "output.views=1",
                       "output.view_mode=mean"],
}
BASE = ["model.name=test_resnet", "model.pretrained=false", "preprocess.input_size=[32, 32]",
        "runtime.batch_size=4", "runtime.num_workers=0", "runtime.threads=1",
        "runtime.progress=false", "runtime.precision=fp32", "runtime.device=cpu",
        "output.shard_size=8"]
SKIPPED_META = {"elapsed_seconds", "versions", "written_at"}


def make_data(root: Path) -> None:
    """PNG only (lossless: no JPEG codec version in the digests), one unreadable file."""
    for c, name in enumerate(("cat", "dog")):
        for i, (w, h) in enumerate([(32, 24), (40, 40), (24, 36), (36, 30), (30, 33)]):
            save(random_image(w, h, seed=10 * c + i), root / name / f"{i:04d}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def npz_bytes(path: Path) -> bytes:
    with np.load(path, allow_pickle=False) as z:
        return b"".join(k.encode() + str(z[k].dtype).encode() + repr(z[k].shape).encode()
                        + z[k].tobytes() for k in sorted(z.files))


def store_digests(out: Path, tmp: Path) -> dict[str, str]:
    """Every file of the store(s) under ``out`` and every recorded meta field, digested."""
    tmp_text = str(tmp.resolve())
    digests = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != ".lock"):
        rel = path.relative_to(out).as_posix()
        if path.name == "meta.json":
            meta = json.loads(path.read_text(encoding="utf-8"))
            for field in sorted(set(meta) - SKIPPED_META):
                text = json.dumps(meta[field], sort_keys=True).replace(tmp_text, "<tmp>")
                digests[f"{rel}:{field}"] = sha(text.encode())
        elif path.suffix == ".npz":
            digests[rel] = sha(npz_bytes(path))
        else:
            digests[rel] = sha(path.read_bytes().replace(tmp_text.encode(), b"<tmp>"))
    return digests


def canary() -> str:
    """test_resnet's fp32 channels_last forward (seed 0, one thread) and a PIL resize."""
    import timm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", pretrained=False).eval()
        model = model.to(memory_format=torch.channels_last)
        x = torch.linspace(-2, 2, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
        with torch.inference_mode():
            out = model(x.contiguous(memory_format=torch.channels_last)).numpy().tobytes()
    finally:
        torch.set_num_threads(threads)
    png = io.BytesIO()
    random_image(40, 36, seed=3).save(png, format="PNG")
    resized = Image.open(io.BytesIO(png.getvalue())).convert("RGB").resize((33, 30),
                                                                          Image.BILINEAR)
    return sha(out + resized.tobytes())


def run_case(tmp: Path, name: str) -> dict[str, str]:
    data, out = tmp / "data", tmp / name
    if not data.exists():
        make_data(data)
    run_extract(load_config(None, [*BASE, f"data.root={data}", f"output.dir={out}",
                                   *CASES[name]], ExtractConfig))
    return store_digests(out, tmp)


CANARY = "c67852801f52b829fe387103b9c61837291cecfa0e65c5090b8b6dee5bb5f1d9"
EXPECTED: dict[str, dict[str, str]] = {
    "head": {
        "config.yaml": "8bcadbd50c0e61fe47be69491936521ec545b0616707e68b4603b7d8c0f1108b",
        "failures.csv": "e27122d46dbbf0b32d1a7123f1392d1eaacfdf19051da3ef9dcc2bac7e86b3c1",
        "fingerprint.json": "a1761a1c0ae81498f8710257d22373b8a738090c318f1eed529de650d7823cfa",
        "index.csv": "8e021641ccded9c37423797d8000c2f513d34bcd8eb1cea1a7a78730e52030e1",
        "index.npz": "b9bf7ffb59df682b136e13eff08b81b5f18f83a759e93a64a7cbfd368af450ee",
        "meta.json:backbone": "76c82fb3d2ab067d979d0a8bf3527c827c9c86772c31c30188879bb4d7d1a891",
        "meta.json:class_names": "cd73b2771c519ee7c8369113fbe26f1866ac66570b70c3a8f6b897f893df0671",
        "meta.json:compute": "28afa82e7fb6b694bb1dabf3d23bd2275001d6a10da3cbb5e590106390ac7823",
        "meta.json:config": "59b294739518869436abed5ac8e317bbaffad4cba0e39f6d8b187b00b3eb114a",
        "meta.json:counts": "9d70cdfb2af569b4fba8cf6dcb2a07b2d029d1cfc7b9cdcaffd3f72517251865",
        "meta.json:cut": "db5ef3a0f2df755f0b6116e53d23bd1ac2b6b33e3f36358d3207b9ce5068dec0",
        "meta.json:dim": "7b1a278f5abe8e9da907fc9c29dfd432d60dc76e17b0fabab659d2a508bc65c4",
        "meta.json:dtype": "c530cec0a49eba2469403c49225fe2cf9454317c57bfdc3cd63ddf7b4558fe0d",
        "meta.json:fingerprint": "8b1a1a9f859881db6f4a7401dbc8d25ec621d3c13ad90961971252c25b65e12f",
        "meta.json:format": "03f5a1c3cdb035026cd04b4d10a3452e381dea0090408694deb7fc4bccaf5a31",
        "meta.json:num_failures": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "meta.json:num_keys": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "meta.json:output_shape": "b8b8f879082817d4f7d0cf28ac50336aca056b3e7e2153b857d130886be4758a",
        "meta.json:pool": "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b",
        "meta.json:pool_after_cut": "30a0924a3360be687d1df9fcbbfdff62c01bc0fd14036ab9076cf7f451568666",
        "meta.json:preprocess": "df95f29471e3f65a43dda9bead9f325395ceb38bc69c8aba8f14c873b2aa43f6",
        "meta.json:rows": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "meta.json:runtime": "bd87e366c76ced5391e69abe007ab2520765c1f11f3e63f22ef4606c28d3490e",
        "meta.json:shard_size": "2c624232cdd221771294dfbb310aca000a0df6ac8b66b696d90ef06fdefb64a3",
        "meta.json:shards": "95ff0ae1fc951e83e499889a73a4ac65c829cbfc21aab6cef1c1c09cc58b9368",
        "meta.json:source": "3730b1edd1b6c0b0d1d2712a9ada2723e81988d75553ed827aadc126118ce3dc",
        "meta.json:version": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "shards/failures.jsonl": "0ca1c0e502d3dec9e3dfce9256d9d23af08da777eb481827782e3dedb69c47c5",
        "shards/shard-00000.json": "f1ab9f3591af0a412ed84337ab8394b5307c1da51f217882fed0d5e1b604ae60",
        "shards/shard-00000.npy": "6c57002a0c1c03b53371551c80d710f53c617ec916d9c687ed4c052420d9117e",
        "shards/shard-00001.json": "c8844ee30a27f4f872f7bd55e31abca6f99f5533e45b533a9534d3589cb29ed0",
        "shards/shard-00001.npy": "4befe11ff37484f93b5f7560d3c08d516b02ff49ebf5d4cd257c9461eb5c0ae6"
    },
    "stage1-srp-views": {
        "config.yaml": "87f37fa2ace2a8ce6a5a0951bad4f78cc6e4478a0721d197ed0d55aa2f09e9a4",
        "failures.csv": "e27122d46dbbf0b32d1a7123f1392d1eaacfdf19051da3ef9dcc2bac7e86b3c1",
        "fingerprint.json": "10e2225c154bac41a26359cbd0482c29037c3ab8cc09ba8cb438561b8ed5e13c",
        "index.csv": "35f42402527ed15160957f55acdffae61ba4a02fda415876b94234411a151bc5",
        "index.npz": "b56bb6c88c5501c364b72aa05e7e80160f5c20e1180580f8df789dc3ca27634b",
        "meta.json:backbone": "76c82fb3d2ab067d979d0a8bf3527c827c9c86772c31c30188879bb4d7d1a891",
        "meta.json:class_names": "cd73b2771c519ee7c8369113fbe26f1866ac66570b70c3a8f6b897f893df0671",
        "meta.json:compute": "20fcd9776cefd750490baa9ada4c1b9b490dbab0b282d4f495f4d9b473b7f9a9",
        "meta.json:config": "c6e50baa1f1f1d01a6adfcdd173b15c00958e362394ac2a6873cfb223ee1edb8",
        "meta.json:counts": "9d70cdfb2af569b4fba8cf6dcb2a07b2d029d1cfc7b9cdcaffd3f72517251865",
        "meta.json:cut": "77b558ebfc25dce105c0fec192042a22f19c259ab71a3fb8ca5bdeb89e1b8c93",
        "meta.json:dim": "2c624232cdd221771294dfbb310aca000a0df6ac8b66b696d90ef06fdefb64a3",
        "meta.json:dtype": "c530cec0a49eba2469403c49225fe2cf9454317c57bfdc3cd63ddf7b4558fe0d",
        "meta.json:fingerprint": "f8defc05818f7bcbf0e3e1b7e7a6db70d73204d88f920d830fb9634c1f7a8334",
        "meta.json:format": "03f5a1c3cdb035026cd04b4d10a3452e381dea0090408694deb7fc4bccaf5a31",
        "meta.json:num_failures": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "meta.json:num_keys": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "meta.json:output_shape": "81b913c2943a7ec5d26e4bb97ec0930418b7504e88810734590c91c82c03e9c6",
        "meta.json:pool": "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b",
        "meta.json:pool_after_cut": "30a0924a3360be687d1df9fcbbfdff62c01bc0fd14036ab9076cf7f451568666",
        "meta.json:preprocess": "df95f29471e3f65a43dda9bead9f325395ceb38bc69c8aba8f14c873b2aa43f6",
        "meta.json:reduce": "a5ba01dbf5f9d14bd302980a723eec962fc1cf04133a46f92e254907f5975ab8",
        "meta.json:rows": "f5ca38f748a1d6eaf726b8a42fb575c3c71f1864a8143301782de13da2d9202b",
        "meta.json:runtime": "bd87e366c76ced5391e69abe007ab2520765c1f11f3e63f22ef4606c28d3490e",
        "meta.json:shard_size": "2c624232cdd221771294dfbb310aca000a0df6ac8b66b696d90ef06fdefb64a3",
        "meta.json:shards": "a869a6a7b40dd3f2b9efde6490cd47221329e36452993741c6d70d6427d4f864",
        "meta.json:source": "3730b1edd1b6c0b0d1d2712a9ada2723e81988d75553ed827aadc126118ce3dc",
        "meta.json:version": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "shards/failures.jsonl": "0ca1c0e502d3dec9e3dfce9256d9d23af08da777eb481827782e3dedb69c47c5",
        "shards/shard-00000.json": "ff27b4490e87ee8282a2887945037d920a3088b19b9d8b1e60267c840d6392ec",
        "shards/shard-00000.npy": "b4a7234ced8e06259c46bee0b09afa148d01f5e724ec7ac56e6b86952defcd06",
        "shards/shard-00001.json": "ade6d7b65bcf62ee6f27b59ea0401d9df3c2478a4429acb10fc964c37d786ab4",
        "shards/shard-00001.npy": "7b7157037e40fdbe4da25ca7ada1930f6ccba8178fb5b1fb01743342ef80f9bf",
        "shards/shard-00002.json": "1d53b7952e608bcc7e73bcae9c632454b7a2b5bebafb165ad8ee6dc2447f8e72",
        "shards/shard-00002.npy": "187d13d66b0657521994edbbcaece066f25d1d4aa6c933c662eb3721844200fe"
    },
    "head-list": {
        "head/config.yaml": "91274cd94bf4a8a1291907063cdd66122e41266d6b6907a29fb2c9de8a5c0a6e",
        "head/failures.csv": "e27122d46dbbf0b32d1a7123f1392d1eaacfdf19051da3ef9dcc2bac7e86b3c1",
        "head/fingerprint.json": "d0e3cb2256555ed0572b2e195e7b53c0235e4bf7c694b31aea64c533ac52cea0",
        "head/index.csv": "8e021641ccded9c37423797d8000c2f513d34bcd8eb1cea1a7a78730e52030e1",
        "head/index.npz": "b9bf7ffb59df682b136e13eff08b81b5f18f83a759e93a64a7cbfd368af450ee",
        "head/meta.json:backbone": "76c82fb3d2ab067d979d0a8bf3527c827c9c86772c31c30188879bb4d7d1a891",
        "head/meta.json:class_names": "cd73b2771c519ee7c8369113fbe26f1866ac66570b70c3a8f6b897f893df0671",
        "head/meta.json:compute": "20fcd9776cefd750490baa9ada4c1b9b490dbab0b282d4f495f4d9b473b7f9a9",
        "head/meta.json:config": "07bc00d01e3c6e8c4da331ecb4012a307252c21d61b4603b20d38fcab7cc0cd3",
        "head/meta.json:counts": "9d70cdfb2af569b4fba8cf6dcb2a07b2d029d1cfc7b9cdcaffd3f72517251865",
        "head/meta.json:cut": "db5ef3a0f2df755f0b6116e53d23bd1ac2b6b33e3f36358d3207b9ce5068dec0",
        "head/meta.json:dim": "7b1a278f5abe8e9da907fc9c29dfd432d60dc76e17b0fabab659d2a508bc65c4",
        "head/meta.json:dtype": "c530cec0a49eba2469403c49225fe2cf9454317c57bfdc3cd63ddf7b4558fe0d",
        "head/meta.json:fingerprint": "3d157055f583ad25d00e005f9bf5e30aac91b29147b65152c5658d04c50eeb1c",
        "head/meta.json:format": "03f5a1c3cdb035026cd04b4d10a3452e381dea0090408694deb7fc4bccaf5a31",
        "head/meta.json:num_failures": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "head/meta.json:num_keys": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "head/meta.json:output_shape": "b8b8f879082817d4f7d0cf28ac50336aca056b3e7e2153b857d130886be4758a",
        "head/meta.json:pool": "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b",
        "head/meta.json:pool_after_cut": "30a0924a3360be687d1df9fcbbfdff62c01bc0fd14036ab9076cf7f451568666",
        "head/meta.json:preprocess": "df95f29471e3f65a43dda9bead9f325395ceb38bc69c8aba8f14c873b2aa43f6",
        "head/meta.json:rows": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "head/meta.json:runtime": "bd87e366c76ced5391e69abe007ab2520765c1f11f3e63f22ef4606c28d3490e",
        "head/meta.json:shard_size": "2c624232cdd221771294dfbb310aca000a0df6ac8b66b696d90ef06fdefb64a3",
        "head/meta.json:shards": "95ff0ae1fc951e83e499889a73a4ac65c829cbfc21aab6cef1c1c09cc58b9368",
        "head/meta.json:source": "3730b1edd1b6c0b0d1d2712a9ada2723e81988d75553ed827aadc126118ce3dc",
        "head/meta.json:version": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "head/shards/failures.jsonl": "0ca1c0e502d3dec9e3dfce9256d9d23af08da777eb481827782e3dedb69c47c5",
        "head/shards/shard-00000.json": "f1ab9f3591af0a412ed84337ab8394b5307c1da51f217882fed0d5e1b604ae60",
        "head/shards/shard-00000.npy": "a454a431d46b223bc85ffb913d2bc57b17c0caa1e409f6fe64e7c8e7b26012cb",
        "head/shards/shard-00001.json": "c8844ee30a27f4f872f7bd55e31abca6f99f5533e45b533a9534d3589cb29ed0",
        "head/shards/shard-00001.npy": "4befe11ff37484f93b5f7560d3c08d516b02ff49ebf5d4cd257c9461eb5c0ae6"
    },
    "cuts3": {
        "head/config.yaml": "d36e5ead3409a4d154030aa480871ad75f8113612944c61e5aebf711270c7c7a",
        "head/failures.csv": "e27122d46dbbf0b32d1a7123f1392d1eaacfdf19051da3ef9dcc2bac7e86b3c1",
        "head/fingerprint.json": "d0e3cb2256555ed0572b2e195e7b53c0235e4bf7c694b31aea64c533ac52cea0",
        "head/index.csv": "8e021641ccded9c37423797d8000c2f513d34bcd8eb1cea1a7a78730e52030e1",
        "head/index.npz": "b9bf7ffb59df682b136e13eff08b81b5f18f83a759e93a64a7cbfd368af450ee",
        "head/meta.json:backbone": "76c82fb3d2ab067d979d0a8bf3527c827c9c86772c31c30188879bb4d7d1a891",
        "head/meta.json:class_names": "cd73b2771c519ee7c8369113fbe26f1866ac66570b70c3a8f6b897f893df0671",
        "head/meta.json:compute": "20fcd9776cefd750490baa9ada4c1b9b490dbab0b282d4f495f4d9b473b7f9a9",
        "head/meta.json:config": "888c5f786c1bcce4d7900c28b78df25b471feb6ca4a2fac0c2af29f7eaefca1c",
        "head/meta.json:counts": "9d70cdfb2af569b4fba8cf6dcb2a07b2d029d1cfc7b9cdcaffd3f72517251865",
        "head/meta.json:cut": "db5ef3a0f2df755f0b6116e53d23bd1ac2b6b33e3f36358d3207b9ce5068dec0",
        "head/meta.json:dim": "7b1a278f5abe8e9da907fc9c29dfd432d60dc76e17b0fabab659d2a508bc65c4",
        "head/meta.json:dtype": "c530cec0a49eba2469403c49225fe2cf9454317c57bfdc3cd63ddf7b4558fe0d",
        "head/meta.json:fingerprint": "3d157055f583ad25d00e005f9bf5e30aac91b29147b65152c5658d04c50eeb1c",
        "head/meta.json:format": "03f5a1c3cdb035026cd04b4d10a3452e381dea0090408694deb7fc4bccaf5a31",
        "head/meta.json:num_failures": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "head/meta.json:num_keys": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "head/meta.json:output_shape": "b8b8f879082817d4f7d0cf28ac50336aca056b3e7e2153b857d130886be4758a",
        "head/meta.json:pool": "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b",
        "head/meta.json:pool_after_cut": "30a0924a3360be687d1df9fcbbfdff62c01bc0fd14036ab9076cf7f451568666",
        "head/meta.json:preprocess": "df95f29471e3f65a43dda9bead9f325395ceb38bc69c8aba8f14c873b2aa43f6",
        "head/meta.json:rows": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "head/meta.json:runtime": "bd87e366c76ced5391e69abe007ab2520765c1f11f3e63f22ef4606c28d3490e",
        "head/meta.json:shard_size": "2c624232cdd221771294dfbb310aca000a0df6ac8b66b696d90ef06fdefb64a3",
        "head/meta.json:shards": "95ff0ae1fc951e83e499889a73a4ac65c829cbfc21aab6cef1c1c09cc58b9368",
        "head/meta.json:source": "3730b1edd1b6c0b0d1d2712a9ada2723e81988d75553ed827aadc126118ce3dc",
        "head/meta.json:version": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "head/shards/failures.jsonl": "0ca1c0e502d3dec9e3dfce9256d9d23af08da777eb481827782e3dedb69c47c5",
        "head/shards/shard-00000.json": "f1ab9f3591af0a412ed84337ab8394b5307c1da51f217882fed0d5e1b604ae60",
        "head/shards/shard-00000.npy": "a454a431d46b223bc85ffb913d2bc57b17c0caa1e409f6fe64e7c8e7b26012cb",
        "head/shards/shard-00001.json": "c8844ee30a27f4f872f7bd55e31abca6f99f5533e45b533a9534d3589cb29ed0",
        "head/shards/shard-00001.npy": "4befe11ff37484f93b5f7560d3c08d516b02ff49ebf5d4cd257c9461eb5c0ae6",
        "stage-0/config.yaml": "cd63762cd1e4460922c7c50ac200b0a202823e45d4dd3f4bb33230eba9554aed",
        "stage-0/failures.csv": "e27122d46dbbf0b32d1a7123f1392d1eaacfdf19051da3ef9dcc2bac7e86b3c1",
        "stage-0/fingerprint.json": "c93c7bcd89d2b6ececa77e2ac8be30aef22a4c096aff8c2fce2001ba2de08c72",
        "stage-0/index.csv": "8e021641ccded9c37423797d8000c2f513d34bcd8eb1cea1a7a78730e52030e1",
        "stage-0/index.npz": "b9bf7ffb59df682b136e13eff08b81b5f18f83a759e93a64a7cbfd368af450ee",
        "stage-0/meta.json:backbone": "76c82fb3d2ab067d979d0a8bf3527c827c9c86772c31c30188879bb4d7d1a891",
        "stage-0/meta.json:class_names": "cd73b2771c519ee7c8369113fbe26f1866ac66570b70c3a8f6b897f893df0671",
        "stage-0/meta.json:compute": "20fcd9776cefd750490baa9ada4c1b9b490dbab0b282d4f495f4d9b473b7f9a9",
        "stage-0/meta.json:config": "cb8c60cebf2a89ea28ee09ce36c502560bfe3349a37e2b689a1f613acf491fd9",
        "stage-0/meta.json:counts": "9d70cdfb2af569b4fba8cf6dcb2a07b2d029d1cfc7b9cdcaffd3f72517251865",
        "stage-0/meta.json:cut": "b5b94085f41a214a4b5f0adb13b62bcb830e8573cccec21d16bc875967250ba4",
        "stage-0/meta.json:dim": "864a936a35324151e1c79c44a2e903ff2497f52fa892282d340585f493c637f0",
        "stage-0/meta.json:dtype": "c530cec0a49eba2469403c49225fe2cf9454317c57bfdc3cd63ddf7b4558fe0d",
        "stage-0/meta.json:fingerprint": "4f47256a5e779d1e1217652b660736923ccc53a191225499d3138982c0ada9e2",
        "stage-0/meta.json:format": "03f5a1c3cdb035026cd04b4d10a3452e381dea0090408694deb7fc4bccaf5a31",
        "stage-0/meta.json:num_failures": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "stage-0/meta.json:num_keys": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "stage-0/meta.json:output_shape": "80d2bbbcb744ff15519035eb220698f3896ea44362e0670d45a2841abd8a68d8",
        "stage-0/meta.json:pool": "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b",
        "stage-0/meta.json:pool_after_cut": "30a0924a3360be687d1df9fcbbfdff62c01bc0fd14036ab9076cf7f451568666",
        "stage-0/meta.json:preprocess": "df95f29471e3f65a43dda9bead9f325395ceb38bc69c8aba8f14c873b2aa43f6",
        "stage-0/meta.json:rows": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "stage-0/meta.json:runtime": "bd87e366c76ced5391e69abe007ab2520765c1f11f3e63f22ef4606c28d3490e",
        "stage-0/meta.json:shard_size": "2c624232cdd221771294dfbb310aca000a0df6ac8b66b696d90ef06fdefb64a3",
        "stage-0/meta.json:shards": "95ff0ae1fc951e83e499889a73a4ac65c829cbfc21aab6cef1c1c09cc58b9368",
        "stage-0/meta.json:source": "3730b1edd1b6c0b0d1d2712a9ada2723e81988d75553ed827aadc126118ce3dc",
        "stage-0/meta.json:version": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "stage-0/shards/failures.jsonl": "0ca1c0e502d3dec9e3dfce9256d9d23af08da777eb481827782e3dedb69c47c5",
        "stage-0/shards/shard-00000.json": "f1ab9f3591af0a412ed84337ab8394b5307c1da51f217882fed0d5e1b604ae60",
        "stage-0/shards/shard-00000.npy": "291caaeeb218d20136ad290a3080bed009fafdb46f2402f120dc7483d2351986",
        "stage-0/shards/shard-00001.json": "c8844ee30a27f4f872f7bd55e31abca6f99f5533e45b533a9534d3589cb29ed0",
        "stage-0/shards/shard-00001.npy": "82e6b98f23770e6b2b47edde01f3434857f6bb651afe10a88552156bc3c49d35",
        "stage-2/config.yaml": "db1c79603aed68779b3f875f7471251b5bca8d57913d7a610e03e46654fdcb6f",
        "stage-2/failures.csv": "e27122d46dbbf0b32d1a7123f1392d1eaacfdf19051da3ef9dcc2bac7e86b3c1",
        "stage-2/fingerprint.json": "1d38ac98c6de682686d2baf8c977470a8fa6ed8cf1eae0ea611e76417743a359",
        "stage-2/index.csv": "8e021641ccded9c37423797d8000c2f513d34bcd8eb1cea1a7a78730e52030e1",
        "stage-2/index.npz": "b9bf7ffb59df682b136e13eff08b81b5f18f83a759e93a64a7cbfd368af450ee",
        "stage-2/meta.json:backbone": "76c82fb3d2ab067d979d0a8bf3527c827c9c86772c31c30188879bb4d7d1a891",
        "stage-2/meta.json:class_names": "cd73b2771c519ee7c8369113fbe26f1866ac66570b70c3a8f6b897f893df0671",
        "stage-2/meta.json:compute": "20fcd9776cefd750490baa9ada4c1b9b490dbab0b282d4f495f4d9b473b7f9a9",
        "stage-2/meta.json:config": "894b5f797ced4716b8bfbee29f079f7128e3d61b6a9c032e4c0bd1d1c1c65fe9",
        "stage-2/meta.json:counts": "9d70cdfb2af569b4fba8cf6dcb2a07b2d029d1cfc7b9cdcaffd3f72517251865",
        "stage-2/meta.json:cut": "bd220c983864af5a3c78def6b6ab3b8c7522af6ec50b193e006337e2af0e56e1",
        "stage-2/meta.json:dim": "f7b856c054de7ccced087ad4f9413380ec494e40abc818b840aaad990ca3c5bc",
        "stage-2/meta.json:dtype": "c530cec0a49eba2469403c49225fe2cf9454317c57bfdc3cd63ddf7b4558fe0d",
        "stage-2/meta.json:fingerprint": "5f2aa34ad358e94ac17634b4b154c32684c912db4ce5d32d5882164e601bedca",
        "stage-2/meta.json:format": "03f5a1c3cdb035026cd04b4d10a3452e381dea0090408694deb7fc4bccaf5a31",
        "stage-2/meta.json:num_failures": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "stage-2/meta.json:num_keys": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "stage-2/meta.json:output_shape": "e4cb88e5a04cd72f16123bc598a1b0de0987fecf7ab57f781fe181dfe7376432",
        "stage-2/meta.json:pool": "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b",
        "stage-2/meta.json:pool_after_cut": "30a0924a3360be687d1df9fcbbfdff62c01bc0fd14036ab9076cf7f451568666",
        "stage-2/meta.json:preprocess": "df95f29471e3f65a43dda9bead9f325395ceb38bc69c8aba8f14c873b2aa43f6",
        "stage-2/meta.json:rows": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "stage-2/meta.json:runtime": "bd87e366c76ced5391e69abe007ab2520765c1f11f3e63f22ef4606c28d3490e",
        "stage-2/meta.json:shard_size": "2c624232cdd221771294dfbb310aca000a0df6ac8b66b696d90ef06fdefb64a3",
        "stage-2/meta.json:shards": "95ff0ae1fc951e83e499889a73a4ac65c829cbfc21aab6cef1c1c09cc58b9368",
        "stage-2/meta.json:source": "3730b1edd1b6c0b0d1d2712a9ada2723e81988d75553ed827aadc126118ce3dc",
        "stage-2/meta.json:version": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "stage-2/shards/failures.jsonl": "0ca1c0e502d3dec9e3dfce9256d9d23af08da777eb481827782e3dedb69c47c5",
        "stage-2/shards/shard-00000.json": "f1ab9f3591af0a412ed84337ab8394b5307c1da51f217882fed0d5e1b604ae60",
        "stage-2/shards/shard-00000.npy": "fc5382d6b197b89e6b4fd2d9fffefa7d2c031fac05f3574a51b1c998f2537a7a",
        "stage-2/shards/shard-00001.json": "c8844ee30a27f4f872f7bd55e31abca6f99f5533e45b533a9534d3589cb29ed0",
        "stage-2/shards/shard-00001.npy": "b05e0be8f0c9f8be3141f965500187bdf6aab7b69210a6960c559fa3cc1079cc"
    },
    "cuts3-pca": {
        "head/config.yaml": "6558eb08fd7fe9084755a751441589617c69be68a1322b3dffc9cb08790f818b",
        "head/failures.csv": "e27122d46dbbf0b32d1a7123f1392d1eaacfdf19051da3ef9dcc2bac7e86b3c1",
        "head/fingerprint.json": "9881ec9da91101e5ae6dca14cae6182b1c904a5385199d4b07802a891f03b1f2",
        "head/index.csv": "8e021641ccded9c37423797d8000c2f513d34bcd8eb1cea1a7a78730e52030e1",
        "head/index.npz": "b9bf7ffb59df682b136e13eff08b81b5f18f83a759e93a64a7cbfd368af450ee",
        "head/meta.json:backbone": "76c82fb3d2ab067d979d0a8bf3527c827c9c86772c31c30188879bb4d7d1a891",
        "head/meta.json:class_names": "cd73b2771c519ee7c8369113fbe26f1866ac66570b70c3a8f6b897f893df0671",
        "head/meta.json:compute": "20fcd9776cefd750490baa9ada4c1b9b490dbab0b282d4f495f4d9b473b7f9a9",
        "head/meta.json:config": "126c65f955af8241a11b1dd52d127df5d99bfcca50029441412614d4fd88854c",
        "head/meta.json:counts": "9d70cdfb2af569b4fba8cf6dcb2a07b2d029d1cfc7b9cdcaffd3f72517251865",
        "head/meta.json:cut": "db5ef3a0f2df755f0b6116e53d23bd1ac2b6b33e3f36358d3207b9ce5068dec0",
        "head/meta.json:dim": "4b227777d4dd1fc61c6f884f48641d02b4d121d3fd328cb08b5531fcacdabf8a",
        "head/meta.json:dtype": "c530cec0a49eba2469403c49225fe2cf9454317c57bfdc3cd63ddf7b4558fe0d",
        "head/meta.json:fingerprint": "d98604a7529914f54c0b0c7409f79e3878a0cd861d204e62993e793129d58830",
        "head/meta.json:format": "03f5a1c3cdb035026cd04b4d10a3452e381dea0090408694deb7fc4bccaf5a31",
        "head/meta.json:num_failures": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "head/meta.json:num_keys": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "head/meta.json:output_shape": "b8b8f879082817d4f7d0cf28ac50336aca056b3e7e2153b857d130886be4758a",
        "head/meta.json:pool": "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b",
        "head/meta.json:pool_after_cut": "30a0924a3360be687d1df9fcbbfdff62c01bc0fd14036ab9076cf7f451568666",
        "head/meta.json:preprocess": "df95f29471e3f65a43dda9bead9f325395ceb38bc69c8aba8f14c873b2aa43f6",
        "head/meta.json:reduce": "98ec18f93859596e3dc6da40131663cd6b3f3f9d92bbb20273242fceffd0d8de",
        "head/meta.json:rows": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "head/meta.json:runtime": "bd87e366c76ced5391e69abe007ab2520765c1f11f3e63f22ef4606c28d3490e",
        "head/meta.json:shard_size": "2c624232cdd221771294dfbb310aca000a0df6ac8b66b696d90ef06fdefb64a3",
        "head/meta.json:shards": "95ff0ae1fc951e83e499889a73a4ac65c829cbfc21aab6cef1c1c09cc58b9368",
        "head/meta.json:source": "3730b1edd1b6c0b0d1d2712a9ada2723e81988d75553ed827aadc126118ce3dc",
        "head/meta.json:version": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "head/reduce-pca.npz": "46c255e7f9c10ac4fbff664ea8c7b1b3978e00847e66968a04426ab4d4385f6c",
        "head/shards/failures.jsonl": "0ca1c0e502d3dec9e3dfce9256d9d23af08da777eb481827782e3dedb69c47c5",
        "head/shards/shard-00000.json": "f1ab9f3591af0a412ed84337ab8394b5307c1da51f217882fed0d5e1b604ae60",
        "head/shards/shard-00000.npy": "e10c8cc9fa9ff3c720c7168c192c83032bb0ab7eba9ba804dc7614fed0d89d93",
        "head/shards/shard-00001.json": "c8844ee30a27f4f872f7bd55e31abca6f99f5533e45b533a9534d3589cb29ed0",
        "head/shards/shard-00001.npy": "99f272134d5289493803cb9e14bcb6198a2eefe1ac27afe1173cee207ad2afa4",
        "stage-0/config.yaml": "5be9faa7ea2c3b6b66eb3f2306a9bc40e4473bde4f33a5c794d593d59937bb3c",
        "stage-0/failures.csv": "e27122d46dbbf0b32d1a7123f1392d1eaacfdf19051da3ef9dcc2bac7e86b3c1",
        "stage-0/fingerprint.json": "d89f0a845426ed8a452c6961f3af208d0b73cc4a129eb76d23a3e1f9348ed159",
        "stage-0/index.csv": "8e021641ccded9c37423797d8000c2f513d34bcd8eb1cea1a7a78730e52030e1",
        "stage-0/index.npz": "b9bf7ffb59df682b136e13eff08b81b5f18f83a759e93a64a7cbfd368af450ee",
        "stage-0/meta.json:backbone": "76c82fb3d2ab067d979d0a8bf3527c827c9c86772c31c30188879bb4d7d1a891",
        "stage-0/meta.json:class_names": "cd73b2771c519ee7c8369113fbe26f1866ac66570b70c3a8f6b897f893df0671",
        "stage-0/meta.json:compute": "20fcd9776cefd750490baa9ada4c1b9b490dbab0b282d4f495f4d9b473b7f9a9",
        "stage-0/meta.json:config": "279d1f9413798bd410abba16c96629499f744d4f711cf10782e959a250a59455",
        "stage-0/meta.json:counts": "9d70cdfb2af569b4fba8cf6dcb2a07b2d029d1cfc7b9cdcaffd3f72517251865",
        "stage-0/meta.json:cut": "b5b94085f41a214a4b5f0adb13b62bcb830e8573cccec21d16bc875967250ba4",
        "stage-0/meta.json:dim": "4b227777d4dd1fc61c6f884f48641d02b4d121d3fd328cb08b5531fcacdabf8a",
        "stage-0/meta.json:dtype": "c530cec0a49eba2469403c49225fe2cf9454317c57bfdc3cd63ddf7b4558fe0d",
        "stage-0/meta.json:fingerprint": "305b200a3873e29c594db2eab0707f2bc5bc5cfb20833763847ce5dc22ca9d98",
        "stage-0/meta.json:format": "03f5a1c3cdb035026cd04b4d10a3452e381dea0090408694deb7fc4bccaf5a31",
        "stage-0/meta.json:num_failures": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "stage-0/meta.json:num_keys": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "stage-0/meta.json:output_shape": "80d2bbbcb744ff15519035eb220698f3896ea44362e0670d45a2841abd8a68d8",
        "stage-0/meta.json:pool": "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b",
        "stage-0/meta.json:pool_after_cut": "30a0924a3360be687d1df9fcbbfdff62c01bc0fd14036ab9076cf7f451568666",
        "stage-0/meta.json:preprocess": "df95f29471e3f65a43dda9bead9f325395ceb38bc69c8aba8f14c873b2aa43f6",
        "stage-0/meta.json:reduce": "52a3e5f065865f57a02b68b8b1f10d0b64bfd78e79309e334fbe4d978d090fe2",
        "stage-0/meta.json:rows": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "stage-0/meta.json:runtime": "bd87e366c76ced5391e69abe007ab2520765c1f11f3e63f22ef4606c28d3490e",
        "stage-0/meta.json:shard_size": "2c624232cdd221771294dfbb310aca000a0df6ac8b66b696d90ef06fdefb64a3",
        "stage-0/meta.json:shards": "95ff0ae1fc951e83e499889a73a4ac65c829cbfc21aab6cef1c1c09cc58b9368",
        "stage-0/meta.json:source": "3730b1edd1b6c0b0d1d2712a9ada2723e81988d75553ed827aadc126118ce3dc",
        "stage-0/meta.json:version": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "stage-0/reduce-pca.npz": "2d94b6ae1933019b31b1d4b00cd2c1d5e6bb2a7911372d972d26daf724d2b4f6",
        "stage-0/shards/failures.jsonl": "0ca1c0e502d3dec9e3dfce9256d9d23af08da777eb481827782e3dedb69c47c5",
        "stage-0/shards/shard-00000.json": "f1ab9f3591af0a412ed84337ab8394b5307c1da51f217882fed0d5e1b604ae60",
        "stage-0/shards/shard-00000.npy": "7c5cd953448241133959f6bf0d19e53f1d75760dc9663945f47d7c760d026255",
        "stage-0/shards/shard-00001.json": "c8844ee30a27f4f872f7bd55e31abca6f99f5533e45b533a9534d3589cb29ed0",
        "stage-0/shards/shard-00001.npy": "2f333ee5bd6501e8c019fd63b6791ec1182b92e916747e09cee8b491c2458f95",
        "stage-2/config.yaml": "dc53f65728bb2b7ad130959c0765342e0b4aa8b2631addb7e8eee2522d8d1d6c",
        "stage-2/failures.csv": "e27122d46dbbf0b32d1a7123f1392d1eaacfdf19051da3ef9dcc2bac7e86b3c1",
        "stage-2/fingerprint.json": "782303eb6ba4863689631f42bff0054adb90b19f4335bc10614cb87dec812df1",
        "stage-2/index.csv": "8e021641ccded9c37423797d8000c2f513d34bcd8eb1cea1a7a78730e52030e1",
        "stage-2/index.npz": "b9bf7ffb59df682b136e13eff08b81b5f18f83a759e93a64a7cbfd368af450ee",
        "stage-2/meta.json:backbone": "76c82fb3d2ab067d979d0a8bf3527c827c9c86772c31c30188879bb4d7d1a891",
        "stage-2/meta.json:class_names": "cd73b2771c519ee7c8369113fbe26f1866ac66570b70c3a8f6b897f893df0671",
        "stage-2/meta.json:compute": "20fcd9776cefd750490baa9ada4c1b9b490dbab0b282d4f495f4d9b473b7f9a9",
        "stage-2/meta.json:config": "54357397f9fad0a9c49bc74f96d50e97ea226af60e1cd248d5318520a8656478",
        "stage-2/meta.json:counts": "9d70cdfb2af569b4fba8cf6dcb2a07b2d029d1cfc7b9cdcaffd3f72517251865",
        "stage-2/meta.json:cut": "bd220c983864af5a3c78def6b6ab3b8c7522af6ec50b193e006337e2af0e56e1",
        "stage-2/meta.json:dim": "4b227777d4dd1fc61c6f884f48641d02b4d121d3fd328cb08b5531fcacdabf8a",
        "stage-2/meta.json:dtype": "c530cec0a49eba2469403c49225fe2cf9454317c57bfdc3cd63ddf7b4558fe0d",
        "stage-2/meta.json:fingerprint": "2a7658cd5663e7883e02dc7634d5b99c21a12abd8b70968396cf264bd1f608d4",
        "stage-2/meta.json:format": "03f5a1c3cdb035026cd04b4d10a3452e381dea0090408694deb7fc4bccaf5a31",
        "stage-2/meta.json:num_failures": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "stage-2/meta.json:num_keys": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "stage-2/meta.json:output_shape": "e4cb88e5a04cd72f16123bc598a1b0de0987fecf7ab57f781fe181dfe7376432",
        "stage-2/meta.json:pool": "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b",
        "stage-2/meta.json:pool_after_cut": "30a0924a3360be687d1df9fcbbfdff62c01bc0fd14036ab9076cf7f451568666",
        "stage-2/meta.json:preprocess": "df95f29471e3f65a43dda9bead9f325395ceb38bc69c8aba8f14c873b2aa43f6",
        "stage-2/meta.json:reduce": "d27bdaf279ece0ca8be8cf8bd2fa1ec1da6475ba7cb17ba2edead3a15a8046bb",
        "stage-2/meta.json:rows": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "stage-2/meta.json:runtime": "bd87e366c76ced5391e69abe007ab2520765c1f11f3e63f22ef4606c28d3490e",
        "stage-2/meta.json:shard_size": "2c624232cdd221771294dfbb310aca000a0df6ac8b66b696d90ef06fdefb64a3",
        "stage-2/meta.json:shards": "95ff0ae1fc951e83e499889a73a4ac65c829cbfc21aab6cef1c1c09cc58b9368",
        "stage-2/meta.json:source": "3730b1edd1b6c0b0d1d2712a9ada2723e81988d75553ed827aadc126118ce3dc",
        "stage-2/meta.json:version": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "stage-2/reduce-pca.npz": "1dbce97c2634b66ac9ec453060a4ee6d4e7b53f9bdbd19f2992cdbfc430445f9",
        "stage-2/shards/failures.jsonl": "0ca1c0e502d3dec9e3dfce9256d9d23af08da777eb481827782e3dedb69c47c5",
        "stage-2/shards/shard-00000.json": "f1ab9f3591af0a412ed84337ab8394b5307c1da51f217882fed0d5e1b604ae60",
        "stage-2/shards/shard-00000.npy": "9c8226d389b1f41b154f19b0a57a4024946bcf9ff67615378c8fd441c72c46e4",
        "stage-2/shards/shard-00001.json": "c8844ee30a27f4f872f7bd55e31abca6f99f5533e45b533a9534d3589cb29ed0",
        "stage-2/shards/shard-00001.npy": "3e8772351684858ea299245e50b766ec6bd8f54461c8e6b2e3da0cb081c55fdf"
    },
    "cuts2-srp-mean": {
        "head/config.yaml": "5da60f3f1fd5c487125199621365c3d27ef33d54f25311195df12bb517fdf015",
        "head/failures.csv": "e27122d46dbbf0b32d1a7123f1392d1eaacfdf19051da3ef9dcc2bac7e86b3c1",
        "head/fingerprint.json": "10eb74c7fdff1f3716b89fbbfe3fd062d894785df379d25423bf21ecb134e0b7",
        "head/index.csv": "8e021641ccded9c37423797d8000c2f513d34bcd8eb1cea1a7a78730e52030e1",
        "head/index.npz": "b9bf7ffb59df682b136e13eff08b81b5f18f83a759e93a64a7cbfd368af450ee",
        "head/meta.json:backbone": "76c82fb3d2ab067d979d0a8bf3527c827c9c86772c31c30188879bb4d7d1a891",
        "head/meta.json:class_names": "cd73b2771c519ee7c8369113fbe26f1866ac66570b70c3a8f6b897f893df0671",
        "head/meta.json:compute": "20fcd9776cefd750490baa9ada4c1b9b490dbab0b282d4f495f4d9b473b7f9a9",
        "head/meta.json:config": "0f085031354c105db653ca50d4928cc8d52f86954078275cb6da595c73ae3352",
        "head/meta.json:counts": "9d70cdfb2af569b4fba8cf6dcb2a07b2d029d1cfc7b9cdcaffd3f72517251865",
        "head/meta.json:cut": "db5ef3a0f2df755f0b6116e53d23bd1ac2b6b33e3f36358d3207b9ce5068dec0",
        "head/meta.json:dim": "b17ef6d19c7a5b1ee83b907c595526dcb1eb06db8227d650d5dda0a9f4ce8cd9",
        "head/meta.json:dtype": "c530cec0a49eba2469403c49225fe2cf9454317c57bfdc3cd63ddf7b4558fe0d",
        "head/meta.json:fingerprint": "91a5bdca440265592fc77ee296ba8ed230606b78ce3609abd0939c246fba71e8",
        "head/meta.json:format": "03f5a1c3cdb035026cd04b4d10a3452e381dea0090408694deb7fc4bccaf5a31",
        "head/meta.json:num_failures": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "head/meta.json:num_keys": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "head/meta.json:output_shape": "b8b8f879082817d4f7d0cf28ac50336aca056b3e7e2153b857d130886be4758a",
        "head/meta.json:pool": "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b",
        "head/meta.json:pool_after_cut": "30a0924a3360be687d1df9fcbbfdff62c01bc0fd14036ab9076cf7f451568666",
        "head/meta.json:preprocess": "df95f29471e3f65a43dda9bead9f325395ceb38bc69c8aba8f14c873b2aa43f6",
        "head/meta.json:reduce": "e54a9f662775640d4be8bd4544965d577ae814ea7f6e37c9455f7605a39b5ca9",
        "head/meta.json:rows": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "head/meta.json:runtime": "bd87e366c76ced5391e69abe007ab2520765c1f11f3e63f22ef4606c28d3490e",
        "head/meta.json:shard_size": "2c624232cdd221771294dfbb310aca000a0df6ac8b66b696d90ef06fdefb64a3",
        "head/meta.json:shards": "95ff0ae1fc951e83e499889a73a4ac65c829cbfc21aab6cef1c1c09cc58b9368",
        "head/meta.json:source": "3730b1edd1b6c0b0d1d2712a9ada2723e81988d75553ed827aadc126118ce3dc",
        "head/meta.json:version": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "head/shards/failures.jsonl": "0ca1c0e502d3dec9e3dfce9256d9d23af08da777eb481827782e3dedb69c47c5",
        "head/shards/shard-00000.json": "f1ab9f3591af0a412ed84337ab8394b5307c1da51f217882fed0d5e1b604ae60",
        "head/shards/shard-00000.npy": "ef35ade446dbcc4e51d7075cc5116b92d8bd166f4dc1e8776d06da46905ffd73",
        "head/shards/shard-00001.json": "c8844ee30a27f4f872f7bd55e31abca6f99f5533e45b533a9534d3589cb29ed0",
        "head/shards/shard-00001.npy": "b8475348853c371f9b03f3c681f85f06fb962c5935d300d5f952d224c2e2a45e",
        "stage-0/config.yaml": "c36c63ba9dea45e35bfc487a49e4b85e1ac34ce4398ce6f9318214ba66ac1ff7",
        "stage-0/failures.csv": "e27122d46dbbf0b32d1a7123f1392d1eaacfdf19051da3ef9dcc2bac7e86b3c1",
        "stage-0/fingerprint.json": "449765d06b562aa89403e27e99d593c0049dc1fcafb08d7cce4bec31e37a53b6",
        "stage-0/index.csv": "8e021641ccded9c37423797d8000c2f513d34bcd8eb1cea1a7a78730e52030e1",
        "stage-0/index.npz": "b9bf7ffb59df682b136e13eff08b81b5f18f83a759e93a64a7cbfd368af450ee",
        "stage-0/meta.json:backbone": "76c82fb3d2ab067d979d0a8bf3527c827c9c86772c31c30188879bb4d7d1a891",
        "stage-0/meta.json:class_names": "cd73b2771c519ee7c8369113fbe26f1866ac66570b70c3a8f6b897f893df0671",
        "stage-0/meta.json:compute": "20fcd9776cefd750490baa9ada4c1b9b490dbab0b282d4f495f4d9b473b7f9a9",
        "stage-0/meta.json:config": "d8031d2b6ffa094b82706228b461c450c5f69f20912bc3d7b4f8178fe64c173b",
        "stage-0/meta.json:counts": "9d70cdfb2af569b4fba8cf6dcb2a07b2d029d1cfc7b9cdcaffd3f72517251865",
        "stage-0/meta.json:cut": "b5b94085f41a214a4b5f0adb13b62bcb830e8573cccec21d16bc875967250ba4",
        "stage-0/meta.json:dim": "b17ef6d19c7a5b1ee83b907c595526dcb1eb06db8227d650d5dda0a9f4ce8cd9",
        "stage-0/meta.json:dtype": "c530cec0a49eba2469403c49225fe2cf9454317c57bfdc3cd63ddf7b4558fe0d",
        "stage-0/meta.json:fingerprint": "172ec54d6bdb12785f8af74709a7523e586e0baca44337f801f08caf0f7b2b14",
        "stage-0/meta.json:format": "03f5a1c3cdb035026cd04b4d10a3452e381dea0090408694deb7fc4bccaf5a31",
        "stage-0/meta.json:num_failures": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "stage-0/meta.json:num_keys": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "stage-0/meta.json:output_shape": "80d2bbbcb744ff15519035eb220698f3896ea44362e0670d45a2841abd8a68d8",
        "stage-0/meta.json:pool": "74234e98afe7498fb5daf1f36ac2d78acc339464f950703b8c019892f982b90b",
        "stage-0/meta.json:pool_after_cut": "30a0924a3360be687d1df9fcbbfdff62c01bc0fd14036ab9076cf7f451568666",
        "stage-0/meta.json:preprocess": "df95f29471e3f65a43dda9bead9f325395ceb38bc69c8aba8f14c873b2aa43f6",
        "stage-0/meta.json:reduce": "83d186233d6a63e34bc08e63285d145dc07183168e6fde57cadd0e273d043acd",
        "stage-0/meta.json:rows": "4a44dc15364204a80fe80e9039455cc1608281820fe2b24f1e5233ade6af1dd5",
        "stage-0/meta.json:runtime": "bd87e366c76ced5391e69abe007ab2520765c1f11f3e63f22ef4606c28d3490e",
        "stage-0/meta.json:shard_size": "2c624232cdd221771294dfbb310aca000a0df6ac8b66b696d90ef06fdefb64a3",
        "stage-0/meta.json:shards": "95ff0ae1fc951e83e499889a73a4ac65c829cbfc21aab6cef1c1c09cc58b9368",
        "stage-0/meta.json:source": "3730b1edd1b6c0b0d1d2712a9ada2723e81988d75553ed827aadc126118ce3dc",
        "stage-0/meta.json:version": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
        "stage-0/shards/failures.jsonl": "0ca1c0e502d3dec9e3dfce9256d9d23af08da777eb481827782e3dedb69c47c5",
        "stage-0/shards/shard-00000.json": "f1ab9f3591af0a412ed84337ab8394b5307c1da51f217882fed0d5e1b604ae60",
        "stage-0/shards/shard-00000.npy": "ebd6011dfb0e6b4ba2172930aba59686d15961471973e8a59e6200c9607a6758",
        "stage-0/shards/shard-00001.json": "c8844ee30a27f4f872f7bd55e31abca6f99f5533e45b533a9534d3589cb29ed0",
        "stage-0/shards/shard-00001.npy": "92d080851f7a4c70dde4709a15aebaf61559158524bbf957959d9b1fe570d2fa"
    }
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_stores_are_byte_identical_to_the_previous_runner(tmp_path, name):
    if canary() != CANARY:
        pytest.skip("this machine computes test_resnet or PIL resizes with other rounding "
                    "than the machine the digests were recorded on")
    got = run_case(tmp_path, name)
    want = EXPECTED[name]
    assert sorted(got) == sorted(want)  # the same files and meta fields
    assert {k: v for k, v in got.items() if want[k] != v} == {}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        recorded = {name: run_case(Path(tmp), name) for name in CASES}
    print(f"CANARY = {canary()!r}")
    print(f"EXPECTED = {json.dumps(recorded, indent=4)}")
